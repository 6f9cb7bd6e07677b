import json

import pytest
import typer
from safetensors import safe_open
from typer.testing import CliRunner

from cleandift.cli import app
from tests.corpus import encode


@pytest.fixture(scope="module")
def files(tmp_path_factory, photo, photo2):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "a.jpg").write_bytes(encode(photo, "JPEG", quality=95))
    (folder / "b.png").write_bytes(encode(photo2, "PNG"))
    return folder


def run(*args):
    result = CliRunner().invoke(app, list(map(str, args)))
    return result


def test_demo_model_writes_a_small_loadable_folder(tmp_path):
    result = run("demo-model", tmp_path / "demo", "--seed", 1)
    assert result.exit_code == 0, result.output
    size = sum(p.stat().st_size for p in (tmp_path / "demo").rglob("*") if p.is_file())
    assert size < 10_000_000
    info = run("info", "--model", tmp_path / "demo")
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout[info.stdout.index("{"):])["version"] == "demo-seed1"


def test_info_has_the_models_endpoint_shape(demo_dir):
    result = run("info", "--model", demo_dir)
    body = json.loads(result.stdout[result.stdout.index("{"):])
    assert {"name", "version", "base", "input_size", "default_layers", "correspondence_layer",
            "layers"} <= set(body)
    assert body["layers"]["us6"] == {"channels": 64, "stride": 16}


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_extract_names_tensors_by_stem_and_key(files, demo_dir, tmp_path):
    out = tmp_path / "f.safetensors"
    result = run("extract", files / "a.jpg", files / "b.png", "--layers", "us6,mid",
                 "--out", out, "--model", demo_dir)
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as fh:
        assert set(fh.keys()) == {"a/us6", "a/mid", "b/us6", "b/mid"}
        assert fh.get_tensor("a/us6").shape == (64, 16, 16)
        assert fh.metadata()["model"] == "cleandift-demo"
    single = tmp_path / "one.safetensors"
    assert run("extract", files / "a.jpg", "--out", single, "--model", demo_dir).exit_code == 0
    with safe_open(str(single), "pt") as fh:
        assert list(fh.keys()) == ["us6"]


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_correspond_prints_the_api_body(files, demo_dir):
    result = run("correspond", files / "a.jpg", files / "b.png",
                 "--points", "[[10, 20], [100, 50]]", "--model", demo_dir)
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout[result.stdout.index("{"):])
    assert [m["source"] for m in body["matches"]] == [[10.0, 20.0], [100.0, 50.0]]
    assert all(0 <= m["target"][0] < 300 and 0 <= m["target"][1] < 280 for m in body["matches"])
    mutual = run("correspond", files / "a.jpg", files / "b.png", "--max-matches", 5,
                 "--model", demo_dir)
    assert len(json.loads(mutual.stdout[mutual.stdout.index("{"):])["matches"]) == 5


@pytest.mark.parametrize(
    "args",
    [["--points", "[[1e9, 0]]"], ["--points", "not json"], ["--layer", "us99"], ["--size", "100"],
     ["--mode", "nope"]],
)
def test_bad_arguments_exit_2_with_a_message(files, demo_dir, args):
    result = run("correspond", files / "a.jpg", files / "b.png", "--model", demo_dir, *args)
    assert result.exit_code == 2
    assert "error:" in result.output or "Invalid value" in result.output


def test_unreadable_image_and_missing_model(files, demo_dir, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    result = run("extract", tmp_path / "bad.jpg", "--out", tmp_path / "x.safetensors",
                 "--model", demo_dir)
    assert result.exit_code == 2 and "bad.jpg" in result.output
    result = run("info", "--model", tmp_path / "nothing-here")
    assert result.exit_code == 2 and "no model" in result.output


def every_command() -> typer.Typer:
    """The core commands plus those registered from other modules (as `main` does)."""
    from cleandift import warps_cli
    from cleandift.service import cli as service_cli

    full = typer.Typer()
    full.registered_commands = list(app.registered_commands)
    warps_cli.register(full)
    service_cli.register(full)
    return full


@pytest.mark.parametrize(("flag", "value", "says", "commands"), [
    ("--layers", "us6,nope", "unknown layer(s) ['nope']", ("extract", "eval-warps",
                                                           "extract-dataset")),
    ("--size", "65", "multiple of 64", ("extract", "correspond", "eval-warps",
                                         "extract-dataset")),
])
def test_a_bad_layer_or_size_is_refused_before_the_model_loads(files, tmp_path, flag, value,
                                                                says, commands):
    """A typo is named at once: the model (here one that does not exist, which would be an
    error of its own) is never loaded."""
    full = every_command()
    given = {"extract": ["extract", files / "a.jpg", "--out", tmp_path / "x.safetensors"],
             "correspond": ["correspond", files / "a.jpg", files / "b.png"],
             "eval-warps": ["eval-warps", files],
             "extract-dataset": ["extract-dataset", files, "--out", tmp_path / "ds"]}
    for name in commands:
        args = [*given[name], flag, value, "--model", tmp_path / "nothing-here"]
        result = CliRunner().invoke(full, list(map(str, args)))
        assert result.exit_code == 2, result.output
        assert says in result.output and "no model" not in result.output
    assert not (tmp_path / "ds").exists()  # nothing written that a rerun would trip on


def test_api_and_worker_without_a_redis_url_say_so_in_one_line(monkeypatch):
    for name in ("REDIS_URL", "CLEANDIFT_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    full = every_command()
    for command in ("api", "worker"):
        result = CliRunner().invoke(full, [command])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Redis URL" in lines[0]


@pytest.mark.integration  # it connects (to a port where no Redis listens)
def test_a_worker_that_cannot_reach_redis_says_so_before_loading(monkeypatch):
    result = CliRunner().invoke(every_command(), ["worker", "--redis-url",
                                                  "redis://127.0.0.1:1/0"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach Redis at "), lines


def test_an_unknown_demo_model_kind_is_a_usage_error(tmp_path):
    result = run("demo-model", tmp_path / "m", "--kind", "nope")
    assert result.exit_code == 2 and "Invalid value" in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["serve", "--log-format", "xml"], {},
     "error: invalid --log-format (CLEANDIFT_LOG_FORMAT): Input should be 'text' or 'json' "
     "(got 'xml')"),
    (["serve"], {"CLEANDIFT_TRACING": "x"}, "error: invalid --tracing (CLEANDIFT_TRACING): "),
    (["info"], {"CLEANDIFT_MAX_BATCH": "-1"},
     "error: invalid CLEANDIFT_MAX_BATCH: Input should be greater than or equal to 1"),
    (["extract", "a.jpg", "--out", "b", "--dtype", "float8"], {},
     "error: invalid --dtype (CLEANDIFT_DTYPE): unknown dtype 'float8'"),
    (["api", "--redis-url", "notaurl"], {},
     "error: invalid --redis-url (CLEANDIFT_REDIS_URL): a Redis URL starts with redis://"),
    (["worker"], {"REDIS_URL": "redis://host:port/0"},
     "error: invalid --redis-url (CLEANDIFT_REDIS_URL): not a Redis URL: Port could not"),
    (["api", "--redis-url", "redis://h:6379/0", "--queue-partitions", "0"], {},
     "error: invalid --queue-partitions (CLEANDIFT_QUEUE_PARTITIONS): Input should be greater"),
    (["info"], {"CLEANDIFT_DEVICES": "gpu7"},
     "error: invalid CLEANDIFT_DEVICES: expected `serve`: where workers run: all"),
    (["info"], {"CLEANDIFT_MIN_SIZE": "65"},
     "error: invalid CLEANDIFT_MIN_SIZE: sizes are multiples of 64"),
])
def test_a_bad_setting_is_one_line_naming_where_it_came_from(args, env, expected, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("REDIS_URL", "CLEANDIFT_REDIS_URL"):
        if name not in env:
            monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(every_command(), args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_help_names_values_plainly(capsys):
    """`--port PORT`, not typer's `--port <int>`; arguments as `SOURCE`, not `{SOURCE}
    <path>`; choices keep their list (the command as `main` runs it: CliRunner's `app`
    would not show the fix). Every command's help."""
    from cleandift.cli import command

    root = command()

    def help_of(name: str) -> str:
        command().main([name, "--help"], prog_name="cleandift", standalone_mode=False)
        return capsys.readouterr().out

    serve = help_of("serve")
    assert "--port PORT" in serve and "-m, --model MODEL" in serve
    assert "--mode <clean|dift>" in help_of("extract")
    assert "Usage: cleandift correspond [OPTIONS] SOURCE TARGET" in help_of("correspond")
    for name in root.commands:  # type: ignore[attr-defined]
        text = help_of(name)
        for label in ("<str>", "<int>", "<path>", "<float>", "<list["):
            assert label not in text, (name, label)
        assert "{" not in text.splitlines()[0], name  # the usage line


def test_bad_points_and_an_unwritable_out_are_named_before_the_model_loads(files, tmp_path):
    result = run("correspond", files / "a.jpg", files / "b.png", "--points", "notjson",
                 "--model", tmp_path / "nothing-here")
    assert result.exit_code == 2 and "error: --points is not JSON" in result.output
    result = run("extract", files / "a.jpg", "--out", tmp_path / "no" / "x.safetensors",
                 "--model", tmp_path / "nothing-here")
    assert result.exit_code == 2 and "error: --out: no folder" in result.output
    assert "no model" not in result.output
