"""What a deployment serves: one or more named models, each with its own workers.

Declared by `--model NAME=SPEC` (repeatable, `CLEANDIFT_MODELS`) or by a TOML file
(`--fleet FILE`) that also carries per-model dtype, devices, workers and batch limits;
a plain `--model SPEC` is today's one unnamed model. Pure functions of the settings, so
`serve`, `api` and the tests read the same answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import tomllib

from cleandift.settings import DEVICE_PATTERN, MODEL_NAME_PATTERN, Settings

_PER_MODEL = {"spec", "unet", "dtype", "device", "devices", "workers", "max_batch",
              "max_batch_pixels"}


class FleetError(ValueError):
    """A fleet declaration that cannot be served (said at start-up, by name)."""


@dataclass(frozen=True)
class ModelPlan:
    """One served model. `name` None: the unnamed model of a one-model deployment."""

    name: str | None
    spec: str | None
    overrides: dict[str, Any] = field(default_factory=dict)  # Settings fields of its workers
    devices: tuple[int, ...] | None = None  # GPUs for its workers; None: serve's --devices
    workers: int | None = None  # None: one per device (GPU) or settings.workers (CPU)

    def settings(self, base: Settings) -> Settings:
        """A worker's settings for this model."""
        update = {"model": self.spec, "model_name": self.name, "models": [],
                  "fleet_file": None, **self.overrides}
        return base.model_copy(update=update)


@dataclass(frozen=True)
class Fleet:
    models: tuple[ModelPlan, ...]
    default: str | None  # the name chosen when a request names none

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models if m.name is not None]


def fleet_of(settings: Settings) -> Fleet:
    """The deployment's models, from the file, the declarations, or the one `model`."""
    if settings.fleet_file is not None and settings.models:
        raise FleetError("declare models either in the fleet file or with --model NAME=SPEC, "
                         "not both")
    if settings.fleet_file is not None:
        try:
            data = tomllib.loads(settings.fleet_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise FleetError(f"fleet file {settings.fleet_file}: {exc}") from exc
        plans = _from_table(data)
        default = settings.default_model or data.get("default")
    elif settings.models:
        plans = [_from_declaration(entry, settings.model) for entry in settings.models]
        default = settings.default_model
    else:
        if settings.default_model is not None:
            raise FleetError("--default-model (CLEANDIFT_DEFAULT_MODEL) names a model, but no "
                             "named models are declared (--model NAME=SPEC, "
                             "CLEANDIFT_MODELS or --fleet)")
        return Fleet((ModelPlan(None, settings.model),), None)
    names = [plan.name for plan in plans]
    if len(set(names)) != len(names):
        raise FleetError(f"a model name is declared twice: {names}")
    default = default or names[0]
    if default not in names:
        raise FleetError(f"the default model {default!r} is not one of {names}")
    return Fleet(tuple(plans), default)


def _name(name: object) -> str:
    if not isinstance(name, str) or not re.match(MODEL_NAME_PATTERN, name):
        raise FleetError(f"model name {name!r}: letters, digits, - and _ (at most 63), "
                         "starting with a letter or digit")
    return name


def _from_declaration(entry: str, fallback_spec: str | None) -> ModelPlan:
    """NAME=SPEC, or NAME alone (an API needs only names; a worker then takes --model)."""
    name, sep, spec = entry.partition("=")
    return ModelPlan(_name(name.strip()), spec.strip() if sep else fallback_spec)


def _from_table(data: dict[str, Any]) -> list[ModelPlan]:
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise FleetError("the fleet file declares no [models.NAME] table")
    unknown_top = set(data) - {"models", "default"}
    if unknown_top:
        raise FleetError(f"unknown keys in the fleet file: {sorted(unknown_top)}")
    return [_plan(_name(name), table) for name, table in models.items()]


def _plan(name: str, table: object) -> ModelPlan:
    if not isinstance(table, dict):
        raise FleetError(f"[models.{name}] must be a table")
    unknown = set(table) - _PER_MODEL
    if unknown:
        raise FleetError(f"[models.{name}]: unknown keys {sorted(unknown)}; known: "
                         f"{sorted(_PER_MODEL)}")
    overrides = {k: table[k] for k in ("unet", "dtype", "device", "max_batch",
                                       "max_batch_pixels") if k in table}
    device = overrides.get("device")
    if device is not None and not re.match(DEVICE_PATTERN, str(device)):
        raise FleetError(f"[models.{name}] device {device!r}: cpu, mps, cuda or cuda:N")
    devices = table.get("devices")
    if devices is not None and (not isinstance(devices, list) or not devices or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)):
        raise FleetError(f"[models.{name}] devices must be a list of GPU indices, e.g. [0, 1]")
    workers = table.get("workers")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool)
                                or workers < 1):
        raise FleetError(f"[models.{name}] workers must be a positive integer")
    try:  # each override is checked (and spelled canonically) by the field it sets
        checked = Settings(**overrides)
    except ValueError as exc:
        raise FleetError(f"[models.{name}]: {exc}") from exc
    overrides = {k: getattr(checked, k) for k in overrides}
    spec = table.get("spec")
    if spec is not None and not isinstance(spec, str):
        raise FleetError(f"[models.{name}] spec must be a string")
    return ModelPlan(name, spec, overrides, tuple(devices) if devices else None, workers)
