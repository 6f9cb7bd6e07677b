import numpy as np

from cleandift.service.messages import Job, JobSpec, LayerMeta, Result, ResultMeta
from cleandift.service.queue.keys import Keys


def test_job_round_trip_keeps_pixels_and_spec():
    images = [np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)] * 2
    spec = JobSpec(kind="correspond", input_size=64, layers=["us6"],
                   image_sizes=[(30, 20), (40, 50)], points=[[1.5, 2.0]], deadline=123.0)
    fields = Job(spec, images).to_fields()
    back = Job.from_fields("1-0", {k.encode(): v.encode() if isinstance(v, str) else v
                                   for k, v in fields.items()})
    assert back.spec == spec and back.entry_id == "1-0"
    assert all(np.array_equal(a, b) for a, b in zip(back.images, images))


def test_result_round_trip_keeps_raw_bytes():
    array = np.arange(24, dtype="<f2").reshape(2, 3, 4)
    result = Result(ResultMeta(job_id="j", model="m", model_version="v",
                               timings_ms={"queue": 1.0},
                               layers={"us6": LayerMeta(shape=[2, 3, 4], dtype="float16")}),
                    data={"us6": array.tobytes()})
    fields = result.to_fields()
    back = Result.from_fields({k.encode(): v.encode() if isinstance(v, str) else v
                               for k, v in fields.items()})
    assert np.array_equal(back.array("us6"), array) and back.meta.model_version == "v"


def test_keys_share_one_prefix():
    keys = Keys("p")
    names = [keys.jobs, keys.dead, keys.workers, keys.model, keys.worker("w"), keys.result("r"),
             keys.replies("a"), keys.registry_channel]
    assert all(n.startswith("p:") for n in names) and len(set(names)) == len(names)


def test_encoding_a_worker_result_leaves_it_as_it_was():
    """A worker's result holds its layers in one `body`: reading or encoding it cuts views
    and changes nothing, so it encodes the same twice (a retried store, a second reader)."""
    us6, mid = np.arange(24, dtype="<f2").reshape(2, 3, 4), np.ones((1, 2, 2), "<f4")
    body = memoryview(us6.tobytes() + mid.tobytes())
    result = Result(ResultMeta(job_id="j", model="m", model_version="v",
                               layers={"us6": LayerMeta(shape=[2, 3, 4], dtype="float16"),
                                       "mid": LayerMeta(shape=[1, 2, 2], dtype="float32")}),
                    body=body)
    first, second = result.to_fields(), result.to_fields()
    assert first == second and result.body is body and result.data == {}
    assert np.array_equal(result.array("mid"), mid) and np.array_equal(result.array("us6"), us6)
    back = Result.from_fields({k.encode(): v.encode() if isinstance(v, str) else v
                               for k, v in first.items()})
    assert np.array_equal(back.array("us6"), us6) and np.array_equal(back.array("mid"), mid)
