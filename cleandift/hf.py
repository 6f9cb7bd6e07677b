"""Quiet the Hugging Face libraries: their per-file progress bars drown our own."""

from __future__ import annotations


def quiet_progress_bars() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


HF_SCHEME = "hf://"


def hub_file(reference: str) -> str:
    """`hf://OWNER/REPO/PATH[@REVISION]` downloaded (or found) in the Hugging Face cache;
    returns the local path. Raises ValueError for a malformed reference and OSError when
    the file is neither cached nor downloadable (offline, private, missing)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    body = reference[len(HF_SCHEME):]
    body, _, revision = body.partition("@")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{reference!r}: expected hf://OWNER/REPO/PATH[@REVISION], e.g. "
                         "hf://CompVis/cleandift/cleandift_sd21_unet.safetensors")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return str(hf_hub_download(repo, filename, revision=revision or None))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise OSError(f"cannot get {filename} from the hub repository {repo}: {exc}. "
                      "Offline, download it once with network access (it is then read from "
                      "the Hugging Face cache) or pass a local file") from exc
