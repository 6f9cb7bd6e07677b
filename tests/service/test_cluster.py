"""A model's queue over several partitions on a real local Redis Cluster (three
`redis-server --cluster-enabled yes` nodes): keys, spreading, features, a node restart."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
import redis
from redis.crc import key_slot

from cleandift.service.processes.redis_cluster import SLOTS
from cleandift.service.queue.connect import queue_keys, sync_client
from cleandift.service.queue.keys import Keys
from cleandift.service.queue.partitions import hash_home
from tests.service.service_helpers import expected_features, running_service

PARTITIONS = 6


def _slot(key: str) -> int:
    return key_slot(key.encode())


def _node_of(key: str, nodes: int = 3) -> int:
    """The node holding a key's slot (start_redis_cluster splits the slots evenly)."""
    return _slot(key) * nodes // SLOTS


def test_a_partition_keeps_its_keys_in_one_slot_and_the_model_its_shared_ones():
    keys = Keys("cleandift", "m", cluster=True)
    for p in range(PARTITIONS):
        part = keys.for_partition(p)
        assert len({_slot(part.jobs), _slot(part.dead), _slot(part.result("j"))}) == 1
    shared = [keys.workers, keys.model, keys.live, keys.staged, keys.wake, keys.worker("w"),
              keys.cancelled("j"), keys.for_partition(2).model]
    assert len({_slot(key) for key in shared}) == 1
    assert len({_slot(keys.for_partition(p).jobs) for p in range(PARTITIONS)}) == PARTITIONS
    # Without partitions or a cluster the names are the ones deployed today.
    assert (Keys().jobs, Keys(served="m").result("j")) == ("cleandift:jobs",
                                                           "cleandift.m:result:j")
    assert {hash_home(f"w{i}", PARTITIONS) for i in range(40)} == set(range(PARTITIONS))


def _prefix_with_shared_node_holding_jobs() -> tuple[str, int]:
    """A queue prefix whose shared keys sit on a node that also holds partitions, so one
    restart takes both away at once (the harder case)."""
    while True:
        prefix = f"test-{uuid.uuid4().hex[:8]}"
        keys = Keys(prefix, cluster=True)
        node = _node_of(keys.workers)
        if any(_node_of(keys.for_partition(p).jobs) == node for p in range(PARTITIONS)):
            return prefix, node


@pytest.fixture
def cluster_settings(settings, redis_cluster):
    prefix, _ = _prefix_with_shared_node_holding_jobs()
    return settings.model_copy(update={"redis_url": redis_cluster.url, "redis_cluster": True,
                                       "queue_partitions": PARTITIONS, "queue_prefix": prefix})


def _post(client, jpeg: bytes, answers: list, index: int) -> None:
    response = client.post("/features", files={"image": ("a.jpg", jpeg)},
                           data={"layers": "us6"}, params={"format": "safetensors"})
    answers[index] = (response, time.monotonic())


def _send(client, jpeg: bytes, count: int) -> tuple[list, list[threading.Thread]]:
    answers: list = [None] * count
    threads = [threading.Thread(target=_post, args=(client, jpeg, answers, i))
               for i in range(count)]
    for thread in threads:
        thread.start()
    return answers, threads


def test_the_service_spreads_jobs_over_partitions_and_answers_exactly(
        cluster_settings, extractor, jpeg):
    from cleandift.client.tensors import read_safetensors

    with running_service(cluster_settings, extractor, workers=2) as (client, _):
        answers, threads = _send(client, jpeg, 12)
        for thread in threads:
            thread.join()
        states = client.get("/metrics").text
    assert all(response.status_code == 200 for response, _ in answers), answers
    r = sync_client(cluster_settings.redis_url, cluster=True)
    keys = queue_keys(cluster_settings)
    used = [p for p in range(PARTITIONS)
            if r.xinfo_stream(keys.for_partition(p).jobs)["last-generated-id"] != b"0-0"]
    assert len(used) >= 3, used  # least-loaded first: the jobs went to several streams
    assert all(r.xlen(keys.for_partition(p).jobs) == 0 for p in range(PARTITIONS))
    assert "cleandift_queue_depth" in states
    want = expected_features(extractor, jpeg, ["us6"])["us6"].numpy()
    for response, _ in answers:
        got = read_safetensors(response.content)[0]["us6"].astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)  # float16 rounding


def test_a_node_restart_with_16_in_flight_loses_nothing(cluster_settings, redis_cluster,
                                                         extractor, jpeg):
    """SIGKILL of the node holding the model's shared keys and some of its streams (its
    last second of writes may be lost: jobs it lost are sent again by the API)."""
    node = _node_of(queue_keys(cluster_settings).workers)
    with running_service(cluster_settings, extractor, workers=2) as (client, _):
        answers, threads = _send(client, jpeg, 16)
        time.sleep(0.3)
        redis_cluster.restart(node, down_s=1.0, kill=True)
        back_at = time.monotonic()
        for thread in threads:
            thread.join()
        after = client.post("/features", files={"image": ("a.jpg", jpeg)},
                            data={"layers": "us6"})
    statuses = [response.status_code for response, _ in answers]
    assert statuses == [200] * 16, [r.text for r, _ in answers if r.status_code != 200]
    assert any(done > back_at for _, done in answers)  # some were in flight across it
    assert after.status_code == 200


def test_answers_of_one_batch_wake_their_waiters_with_one_message(cluster_settings,
                                                                  redis_cluster, monkeypatch):
    """On a cluster a worker sends one PUBLISH per API and batch (every node relays each
    PUBLISH); the API wakes each job it names. The result poll and the deadline are pushed
    out of reach, so only the message can answer them in the 90 s given."""
    import asyncio

    from cleandift.service.messages import Job, JobSpec, LayerMeta, Result, ResultMeta
    from cleandift.service.queue import producer as producer_module
    from cleandift.service.queue.partitions import make_consumer, make_producer

    monkeypatch.setattr(producer_module, "RESULT_POLL_S", 3600.0)
    settings = cluster_settings.model_copy(update={"queue_partitions": 1})
    consumer = make_consumer(settings, sync_client(settings.redis_url, cluster=True), None, "w")

    def answer() -> int:
        taken: list[Job] = []
        while len(taken) < 3:
            taken += consumer.claim(3 - len(taken), 200)
        consumer.complete([(job, Result(ResultMeta(
            job_id=job.spec.id, model="m", model_version="v",
            layers={"us6": LayerMeta(shape=[1], dtype="float16")}))) for job in taken])
        return len(taken)

    async def submit_three() -> list[Result]:
        producer = make_producer(settings, settings.redis_url, None)
        await producer.start()
        while not any(redis.Redis(port=node.port).pubsub_numsub(producer.reply_channel)[0][1]
                      for node in redis_cluster.nodes):  # listening before any answer
            await asyncio.sleep(0.05)
        try:
            jobs = [Job(spec=JobSpec(kind="features", input_size=64, layers=["us6"],
                                     image_sizes=[(64, 64)], deadline=time.time() + 3600),
                        images=[np.zeros((64, 64, 3), np.uint8)]) for _ in range(3)]
            worker = asyncio.get_running_loop().run_in_executor(None, answer)
            results = await asyncio.wait_for(
                asyncio.gather(*(producer.submit(job) for job in jobs)), 90)
            assert await worker == 3
            return list(results)
        finally:
            await producer.stop()

    results = asyncio.run(submit_three())
    assert [r.meta.status for r in results] == [200] * 3
