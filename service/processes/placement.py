"""Which worker runs which model on which device: a pure function of the fleet, the
`--devices` setting and the number of visible GPUs (unit-tested with a fake count)."""

from __future__ import annotations

from dataclasses import dataclass

from ..fleet import Fleet, FleetError, ModelPlan


@dataclass(frozen=True)
class WorkerPlan:
    model: ModelPlan
    index: int  # across the deployment: names the worker and offsets its port
    gpu: int | None  # the physical GPU it is pinned to (CUDA_VISIBLE_DEVICES); None: CPU

    @property
    def device_label(self) -> str:
        return "cpu" if self.gpu is None else f"cuda:{self.gpu}"


def usable_gpus(devices: str | None, visible: int) -> list[int]:
    """The GPUs `--devices` allows: all (or unset) = every visible one; cpu = none."""
    if devices in (None, "all"):
        return list(range(visible))
    if devices == "cpu":
        return []
    chosen = [int(part) for part in devices.split(",")]
    missing = [d for d in chosen if d >= visible]
    if missing:
        raise FleetError(f"--devices names GPU {missing[0]}, but {visible} "
                         f"{'is' if visible == 1 else 'are'} visible")
    if len(set(chosen)) != len(chosen):
        raise FleetError(f"--devices names a GPU twice: {devices}")
    return chosen


def place(fleet: Fleet, devices: str | None, visible: int, cpu_workers: int, *,
          device: str | None = None, gpu_workers: int | None = None) -> list[WorkerPlan]:
    """Every model on its devices (its own list, or all usable GPUs), one worker per
    device unless the model (or `gpu_workers`, an explicit --workers) asks for another
    count; round-robin over its devices. Without GPUs (or on a model or deployment
    `device` of cpu) a model runs its `workers` or `cpu_workers` workers."""
    gpus = usable_gpus(devices, visible)
    plans: list[WorkerPlan] = []
    for model in fleet.models:
        own = _model_gpus(model, gpus, device)
        count = model.workers or (gpu_workers or len(own) if own else cpu_workers)
        for i in range(count):
            plans.append(WorkerPlan(model, len(plans), own[i % len(own)] if own else None))
    return plans


def _model_gpus(model: ModelPlan, gpus: list[int], base_device: str | None) -> list[int]:
    device = str(model.overrides.get("device") or base_device or "")
    if device in ("cpu", "mps"):
        return []
    if model.devices is not None:
        outside = [d for d in model.devices if d not in gpus]
        if outside:
            raise FleetError(f"model {model.name} asks for GPU {outside[0]}, which --devices "
                             f"does not allow (usable: {gpus or 'none'})")
        return list(model.devices)
    if device.startswith("cuda:"):
        index = int(device.split(":")[1])
        if index not in gpus:
            raise FleetError(f"model {model.name} asks for {device}, which is not usable "
                             f"(usable: {gpus or 'none'})")
        return [index]
    if device == "cuda" and not gpus:
        raise FleetError(f"model {model.name} asks for cuda, but no GPU is usable")
    return gpus
