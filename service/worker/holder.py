"""The live model of a worker, swapped for a new version only between batches."""

from __future__ import annotations

import gc
import logging
import threading

import numpy as np
import torch
from PIL import Image

from cleandift.extractor import Extractor
from cleandift.method import LAYER_KEYS

log = logging.getLogger(__name__)


class ModelHolder:
    """Holds the serving Extractor; a loader thread offers a verified replacement."""

    def __init__(self, extractor: Extractor) -> None:
        self.current = extractor
        self._pending: Extractor | None = None
        self._lock = threading.Lock()

    def offer(self, extractor: Extractor) -> None:
        with self._lock:
            self._pending = extractor

    def get(self, version: str | None) -> Extractor | None:
        """The model of `version` if this worker holds it (None: the current one)."""
        current, pending = self.current, self._pending
        if version is None or current.info.version == version:
            return current
        return pending if pending is not None and pending.info.version == version else None

    def maybe_swap(self, version: str | None = None) -> bool:
        """Called by the forward thread between batches; True if the model changed. With
        a `version` (the fleet's live one) only to that version, never before."""
        pending = self._pending
        if pending is None or version not in (None, pending.info.version):
            return False
        with self._lock:
            if self._pending is not pending:
                return False
            new, self._pending = self._pending, None
        old, self.current = self.current, new
        log.info("now serving %s %s (was %s)", new.info.name, new.info.version, old.info.version)
        del old
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # memory returns to one model's worth
        return True


def smoke_test(extractor: Extractor) -> None:
    """One forward on a synthetic image; every feature must be finite. A worker runs it on
    the model it boots with and on every version it reloads, before serving either."""
    size = extractor.info.input_size
    ramp = np.linspace(0, 255, size * size * 3).reshape(size, size, 3).astype(np.uint8)
    feats = extractor.extract([Image.fromarray(ramp)], layers=list(LAYER_KEYS))[0]
    bad = [k for k, v in feats.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"non-finite features at {bad}")
