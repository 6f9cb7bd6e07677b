"""The feature cache: tiers on their own, then through the service."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from cleandift.service.featurecache import FeatureCache, MemoryTier, SharedTier
from cleandift.service.queue.keys import Keys
from tests.corpus import encode, textured_image
from tests.service.service_helpers import redis_client, running_service


def maps(n: int, value: float = 1.0) -> dict[str, torch.Tensor]:
    return {f"m|v1|img{i}|256|clean|p|us6": torch.full((4, 8, 8), value + i) for i in range(n)}


def test_the_memory_tier_is_an_lru_bounded_in_bytes():
    tier = MemoryTier(max_bytes=3 * 4 * 8 * 8 * 4)  # three 4x8x8 float32 maps
    tier.put(maps(3))
    assert tier.get(["m|v1|img0|256|clean|p|us6"])[0] is not None  # img0 is now the newest
    tier.put({"m|v1|img9|256|clean|p|us6": torch.zeros(4, 8, 8)})
    found = tier.get([f"m|v1|img{i}|256|clean|p|us6" for i in (0, 1, 2)])
    assert [f is not None for f in found] == [True, False, True]  # img1 was the oldest
    assert tier.used == 3 * 4 * 8 * 8 * 4
    tier.put({"m|v2|img0|256|clean|p|us6": torch.zeros(1)})  # img9, now the oldest, goes
    assert tier.invalidate("m|v1|") == 2 and len(tier) == 1  # img0 and img2; v2 stays
    assert tier.get(["m|v2|img0|256|clean|p|us6"])[0] is not None and tier.used == 4


@pytest.mark.integration
def test_the_shared_tier_keeps_its_budget_and_drops_one_version(settings):
    r = redis_client(settings)
    tier = SharedTier(r, Keys(settings.queue_prefix), max_bytes=3000)
    tier.put(maps(2))  # two 1 KB maps (+ their headers)
    assert all(t is not None for t in tier.get(list(maps(2))))
    tier.put({"m|v2|x|256|clean|p|us6": torch.zeros(4, 8, 8)})
    assert tier.used() <= 3000  # the oldest v1 map was evicted to make room
    assert tier.get(["m|v1|img0|256|clean|p|us6"]) == [None]
    assert tier.invalidate("m|v1|") == 1 and tier.get(["m|v2|x|256|clean|p|us6"])[0] is not None
    assert tier.used() == int(r.hget(f"{settings.queue_prefix}:cache:sizes",
                                     "m|v2|x|256|clean|p|us6"))
    assert r.xlen(Keys(settings.queue_prefix).jobs) == 0  # (nothing else was touched)


def test_a_request_hits_only_when_every_layer_is_there():
    cache = FeatureCache(MemoryTier(10**6), None)
    keys = ["m|v1|a|256|clean|p", "m|v1|b|256|clean|p"]
    cache.put(keys, [{"us6": torch.ones(2), "us9": torch.ones(3)}] * 2)
    hit, where = cache.get(keys, ["us9"])
    assert where == "memory" and hit is not None and set(hit[1]) == {"us9"}
    assert cache.get(keys, ["us6", "mid"]) == (None, "miss")



def post(client: httpx.Client, image: bytes, **fields) -> httpx.Response:
    return client.post("/features", files={"image": ("x.png", image)}, data=fields,
                       params={"format": "safetensors"})


@pytest.mark.integration
def test_repeated_images_skip_the_forward_and_answer_the_same_bytes(cached_settings, extractor):
    image = encode(textured_image(200, 150, 21), "PNG")
    with running_service(cached_settings, extractor) as (client, threads):
        worker = threads[0].worker
        first = post(client, image, layers="us6,us9")
        again = post(client, image, layers="us6,us9")
        subset = post(client, image, layers="us9", dtype="int8")
        bigger = post(client, image, layers="us6,mid")
        images = worker.metrics.value("cleandift_images_processed_total")
        hits = worker.metrics.value("cleandift_feature_cache_lookups_total", result="memory")
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.content == first.content and again.headers["etag"] == first.headers["etag"]
    assert subset.headers["x-cache"] == "hit" and bigger.headers["x-cache"] == "miss"
    assert images == 2 and hits == 2  # two forwards for four answers


@pytest.mark.integration
def test_an_etag_the_client_holds_is_not_computed_again(cached_settings, extractor):
    image = encode(textured_image(120, 90, 22), "PNG")
    with running_service(cached_settings, extractor) as (client, threads):
        first = post(client, image)
        same = client.post("/features", files={"image": image}, params={"format": "safetensors"},
                           headers={"If-None-Match": first.headers["etag"]})
        other = client.post("/features", files={"image": image}, params={"format": "json"},
                            headers={"If-None-Match": first.headers["etag"]})
        processed = threads[0].worker.metrics.value("cleandift_images_processed_total")
    assert same.status_code == 412 and same.headers["etag"] == first.headers["etag"]
    assert other.status_code == 200  # another format: another answer, another ETag
    assert processed == 1


@pytest.mark.integration
def test_the_shared_tier_serves_another_worker(cached_settings, extractor):
    image = encode(textured_image(160, 120, 23), "PNG")
    shared_only = cached_settings.model_copy(update={"feature_cache_bytes": 0})
    with running_service(shared_only, extractor) as (client, threads):
        post(client, image)
    with running_service(shared_only, extractor) as (client, threads):  # a new worker
        answer = post(client, image)
        shared = threads[0].worker.metrics.value("cleandift_feature_cache_lookups_total",
                                                 result="shared")
        images = threads[0].worker.metrics.value("cleandift_images_processed_total")
    assert answer.headers["x-cache"] == "hit" and shared == 1 and images == 0


@pytest.mark.integration
def test_page_clicks_on_the_same_pair_hit_the_cache(cached_settings, extractor):
    source = encode(textured_image(200, 150, 24), "PNG")
    target = encode(textured_image(180, 160, 25), "PNG")
    with running_service(cached_settings, extractor) as (client, threads):
        for x in (10, 50, 90):  # three clicks: the page sends both images every time
            client.post("/correspond", files={"source": source, "target": target},
                        data={"points": json.dumps([[x, 20]])}).raise_for_status()
        images = threads[0].worker.metrics.value("cleandift_images_processed_total")
    assert images == 2  # the first click computed both images; the others matched only


@pytest.mark.integration
def test_no_shared_tier_on_a_redis_that_may_evict_the_job_stream(cached_settings):
    from cleandift.service.processes.launch_worker import feature_cache
    from cleandift.service.processes.redis_server import start_redis_server

    with start_redis_server() as server:
        r = redis_client(cached_settings.model_copy(update={"redis_url": server.url}))
        assert feature_cache(cached_settings, r).shared is not None  # noeviction: on
        r.config_set("maxmemory", "1gb")
        r.config_set("maxmemory-policy", "volatile-lru")  # only keys with a TTL: on
        assert feature_cache(cached_settings, r).shared is not None
        r.config_set("maxmemory-policy", "allkeys-lru")
        cache = feature_cache(cached_settings, r)
    assert cache.shared is None and cache.memory is not None
