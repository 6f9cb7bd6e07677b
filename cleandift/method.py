"""The constants of the CleanDIFT method and of the DIFT baseline, each written once.

Pure Python (no torch), so the API, the worker, the trainer and the docs tests share them.
"""

from __future__ import annotations

# Key -> dotted module path in diffusers' UNet2DConditionModel, in execution order.
LAYER_MODULES: dict[str, str] = {
    "mid": "mid_block",
    "us1": "up_blocks.0.resnets.0",
    "us2": "up_blocks.0.resnets.1",
    "us3": "up_blocks.0",
    "us4": "up_blocks.1.attentions.0",
    "us5": "up_blocks.1.attentions.1",
    "us6": "up_blocks.1",
    "us7": "up_blocks.2.attentions.0",
    "us8": "up_blocks.2.attentions.1",
    "us9": "up_blocks.2",
    "us10": "up_blocks.3.attentions.0",
}
LAYER_KEYS: tuple[str, ...] = tuple(LAYER_MODULES)
CORRESPONDENCE_LAYER = "us6"  # DIFT's up_ft_index=1: the default read-out for matching

SIZE_MULTIPLE = 64  # input sides: the VAE (x8) and the UNet's three downsamplings (x8)

STUDENT_TIMESTEP = 261.0  # the student's timestep input, learned from this initial value
DIFT_TIMESTEP = 261  # DIFT's noise level for semantic correspondence
DIFT_ENSEMBLE = 8  # noisy samples DIFT averages
DIFT_PROMPT = "a photo of a {category}"

TRAIN_TIMESTEPS = 1000  # T of the noise schedule
MODES = ("clean", "dift")
