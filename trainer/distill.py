"""The CleanDIFT objective: student on clean latents, frozen teacher on noisy ones.

The student's features do not depend on the teacher's timestep, so the student runs ONCE
per image and its features are shared by the three timestep-conditioned head passes (the
reference repeats the clean latent three times: the same maths at three times the cost).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cleandift.layers import unet_features
from cleandift.method import DIFT_TIMESTEP, LAYER_KEYS, STUDENT_TIMESTEP, TRAIN_TIMESTEPS

from .heads import Heads

TIMESTEPS_PER_IMAGE = 3
FIDELITY_TIMESTEPS = (100, DIFT_TIMESTEP, 500, 800)


class Student(nn.Module):
    """Everything that trains: the UNet copy, the 11 heads and the student timestep."""

    def __init__(self, unet: nn.Module, channels: dict[str, int],
                 timestep: float = STUDENT_TIMESTEP) -> None:
        super().__init__()
        self.unet = unet
        self.heads = Heads(channels)
        self.timestep = nn.Parameter(torch.tensor(float(timestep)))

    def features(self, x0: torch.Tensor, context: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.timestep.expand(x0.shape[0])
        return unet_features(self.unet, x0, t, context, list(LAYER_KEYS))

    def forward(self, x0: torch.Tensor, context: torch.Tensor, t: torch.Tensor,
                repeat_student: bool = False) -> dict[str, torch.Tensor]:
        """Head outputs for every (image, teacher timestep) pair, image-major.

        `repeat_student` runs the student on the repeated latents, as the reference code
        does; it exists to test that sharing one student pass changes nothing.
        """
        per_image = t.shape[0] // x0.shape[0]
        if repeat_student:
            feats = self.features(x0.repeat_interleave(per_image, 0),
                                  context.repeat_interleave(per_image, 0))
        else:
            once = self.features(x0, context)
            feats = {k: v.repeat_interleave(per_image, 0) for k, v in once.items()}
        return self.heads(feats, t)


# Teacher timesteps [low, high): all of the schedule, or the official code's draw
# (t_min = 1, t_max = 999, truncated: 1 ... 998).
T_RANGES = {"full": (0, TRAIN_TIMESTEPS), "official": (1, TRAIN_TIMESTEPS - 1)}


def stratified_timesteps(batch: int, generator: torch.Generator, n: int = TIMESTEPS_PER_IMAGE,
                         t_range: str = "full") -> torch.Tensor:
    """t_k ~ U(low + k R/n, low + (k+1) R/n) for k < n, independently per image, R = high -
    low; [batch * n] image-major."""
    low, high = T_RANGES[t_range]
    u = torch.rand(batch, n, generator=generator)
    strata = torch.arange(n, dtype=torch.float32)
    t = (low + (strata + u) * (high - low) / n).floor().long()
    return t.clamp_(min=low, max=high - 1).flatten()


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, computed in fp32 whatever the teacher's
    dtype, then cast to it. In bf16 the schedule itself rounds: sqrt(1 - a_t) is 0 at
    t in {0, 1} (no noise at all) and off by up to 100% below t = 50."""
    noisy = scheduler.add_noise(x0.float(), noise.float(), t.to(x0.device))
    return noisy.to(x0.dtype)


@torch.no_grad()
def teacher_features(teacher: nn.Module, scheduler, x0: torch.Tensor, context: torch.Tensor,
                     t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    per_image = t.shape[0] // x0.shape[0]
    x0 = x0.repeat_interleave(per_image, 0)
    noisy = add_noise(scheduler, x0, noise, t)
    ctx = context.repeat_interleave(per_image, 0)
    return unet_features(teacher, noisy, t.to(x0.device), ctx, list(LAYER_KEYS))


def alignment(pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor]):
    """(loss, per-key mean cosine): loss = - sum over keys of the mean cosine similarity."""
    per_key = {
        k: F.cosine_similarity(pred[k].float(), target[k].float(), dim=1).mean() for k in pred
    }
    return -torch.stack(list(per_key.values())).sum(), per_key


def distill_loss(student: nn.Module, teacher: nn.Module, scheduler, x0: torch.Tensor,
                 context: torch.Tensor, generator: torch.Generator, autocast=None,
                 repeat_student: bool = False, t_range: str = "full"):
    """One batch of the objective: stratified timesteps, teacher on x_t, student on x0.

    Returns (loss, per-key mean cosine). `autocast` is a context factory (mixed precision).
    """
    t = stratified_timesteps(len(x0), generator, t_range=t_range).to(x0.device)
    noise = torch.randn((len(t), *x0.shape[1:]), generator=generator).to(x0.device)
    target = teacher_features(teacher, scheduler, x0, context, t, noise)
    with autocast() if autocast else torch.autocast(x0.device.type, enabled=False):
        pred = student(x0.float(), context.float(), t, repeat_student=repeat_student)
    return alignment(pred, target)


def freeze_unused(student: Student, latent_channels: int, context_dim: int) -> list[str]:
    """Freeze the UNet modules that never run (those after the last key): nothing trains
    them, and DDP would otherwise wait forever for their gradients. Found by running a
    tiny forward and recording which modules were called. Returns their names."""
    unet = student.unet
    owners = {n: m for n, m in unet.named_modules() if next(m.parameters(False), None) is not None}
    ran: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda *_a, n=n: ran.add(n)) for n, m in owners.items()]
    param = next(unet.parameters())
    try:
        with torch.no_grad():
            x = torch.zeros(1, latent_channels, 8, 8, device=param.device, dtype=param.dtype)
            ctx = torch.zeros(1, 1, context_dim, device=param.device, dtype=param.dtype)
            student.features(x, ctx)
    finally:
        for handle in handles:
            handle.remove()
    frozen = sorted(set(owners) - ran)
    for name in frozen:
        for p in owners[name].parameters(recurse=False):
            p.requires_grad_(False)
    return frozen
