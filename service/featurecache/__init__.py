"""The feature cache: an image seen before skips the forward pass.

Entries are one layer's map of one image, in the model's compute dtype, keyed by what
determines it: model name and version, a hash of the model-input pixels (computed by the
API), input size, mode, prompt, compute dtype and device kind. A request is a hit when
every layer it needs is cached, so maps cached for one request answer later requests for
any subset of their layers.

Two tiers. Each worker keeps a bytes-bounded LRU in its own memory (no copy through
anything: the page's repeated clicks land here). Behind it, a shared tier in Redis with
its own byte budget (`shared.py` keeps the accounting and the LRU order),
so a repeated image helps whichever worker takes it. The shared tier never relies on
Redis eviction: the job stream must not be evicted to make room (run Redis with
`maxmemory-policy noeviction`; with an `allkeys-*` policy the worker keeps the shared tier
off). A hot reload drops exactly the old version's entries.
"""

from .shared import SharedTier, eviction_risk
from .tiers import FeatureCache, MemoryTier, image_keys, version_prefix

__all__ = ["FeatureCache", "MemoryTier", "SharedTier", "eviction_risk", "image_keys",
           "version_prefix"]
