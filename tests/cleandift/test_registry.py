import stat

import pytest

from cleandift import registry


@pytest.fixture
def files(tmp_path):
    unet = tmp_path / "u.bin"
    unet.write_bytes(b"unet weights")
    heads = tmp_path / "h.bin"
    heads.write_bytes(b"heads")
    return {registry.UNET_FILE: unet, registry.HEADS_FILE: heads}


def test_publish_versions_latest_and_checksums(tmp_path, files):
    reg = tmp_path / "reg"
    v1, path1 = registry.publish(reg, "m", files, {"base": "demo", "steps": 3})
    v2, path2 = registry.publish(reg, "m", files, {"base": "demo", "steps": 4})
    assert (v1, v2) == ("v1", "v2") and registry.latest_version(reg / "m") == "v2"
    assert registry.resolve(reg / "m") == path2 and registry.resolve(path1) == path1
    manifest = registry.read_manifest(path1)
    assert manifest["name"] == "m" and manifest["version"] == "v1" and manifest["steps"] == 3
    assert set(manifest["sha256"]) == set(files) and manifest["created_at"]
    assert registry.list_versions(reg, "m") == ["v1", "v2"]
    # Readable by another user (trainer and workers often run as different uids).
    assert stat.S_IMODE(path1.stat().st_mode) == 0o755
    assert stat.S_IMODE((reg / "m" / registry.LATEST).stat().st_mode) == 0o644


def test_tampered_or_missing_files_are_refused(tmp_path, files):
    _, path = registry.publish(tmp_path, "m", files, {})
    (path / registry.HEADS_FILE).write_bytes(b"other")
    with pytest.raises(registry.RegistryError, match="checksum"):
        registry.read_manifest(path)
    (path / registry.HEADS_FILE).unlink()
    with pytest.raises(registry.RegistryError, match="missing"):
        registry.read_manifest(path)
    assert registry.read_manifest(path, verify=False)["version"] == "v1"


def test_promote_rolls_back(tmp_path, files):
    registry.publish(tmp_path, "m", files, {})
    registry.publish(tmp_path, "m", files, {})
    registry.promote(tmp_path, "m", "v1")
    assert registry.latest_version(tmp_path / "m") == "v1"
    with pytest.raises(registry.RegistryError):
        registry.promote(tmp_path, "m", "v9")


def test_an_interrupted_publish_leaves_nothing_visible(tmp_path, files):
    registry.publish(tmp_path, "m", files, {})
    # What a publisher killed mid-copy leaves behind: a hidden staging folder.
    partial = tmp_path / "m" / ".staging-dead"
    partial.mkdir()
    (partial / registry.UNET_FILE).write_bytes(b"half")
    assert registry.list_versions(tmp_path, "m") == ["v1"]
    assert registry.resolve(tmp_path / "m").name == "v1"
    v2, _ = registry.publish(tmp_path, "m", files, {})
    assert v2 == "v2"


def test_bad_names_and_paths(tmp_path, files):
    with pytest.raises(registry.RegistryError):
        registry.publish(tmp_path, "../evil", files, {})
    with pytest.raises(registry.RegistryError):
        registry.resolve(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / registry.LATEST).write_text("v3\n")
    with pytest.raises(registry.RegistryError, match="v3"):
        registry.resolve(tmp_path / "m")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / registry.MANIFEST).write_text("{not json")
    with pytest.raises(registry.RegistryError, match="unreadable"):
        registry.read_manifest(tmp_path / "x")
