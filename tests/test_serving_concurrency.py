"""Several serving workers on one real engine: every request gets its own answer.

Each request carries inputs of its own (kiln's load path with `request_feeds`), two workers share the engine
session, and each response is compared with a single-threaded inference of the same input. OpenVINO's
InferRequest and TensorRT's execution context hold one inference's tensors; sharing one between workers mixes
requests up or fails, which is what this catches.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kiln.config.views import Target
from kiln.core.errors import KilnError
from kiln.data.inputs import make_inputs
from kiln.pipeline.engine import build_engine, load_engine
from kiln.runtimes import BuildSource, InstancePool, concurrency_limit
from kiln.serving import BatcherSettings, poisson_arrivals, run_load, warm_up
from kiln.serving.load import feeds_cache

# Its figures are timed: run alone, before the two-worker phase (test.sh)
pytestmark = pytest.mark.timing

SIZES = {1: 0.5, 2: 0.3, 3: 0.2}


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_two_workers_on_a_real_engine_answer_every_request_correctly(tmp_path, tiny_onnx, runtime):
    path, spec, _ = tiny_onnx
    target = Target.from_params("t", {"targets": {"t": {"runtime": runtime, "threads": 1, "profile": {"min": 1, "opt": 4, "max": 8}}}})
    build_engine(target, BuildSource(path, spec), tmp_path / "e")
    session, _ = load_engine(tmp_path / "e", target)
    assert concurrency_limit(session) is None  # the runtime says several workers are safe: this test holds it to that
    arrivals = poisson_arrivals(50000.0, 240, SIZES, seed=3)  # a burst: the queue stays long, both workers busy
    own = {i: make_inputs(spec.inputs, r.size, seed=1000 + i) for i, r in enumerate(arrivals)}
    # The reference: each request alone, one thread, before any load.
    expected = {i: session.infer(feeds) for i, feeds in own.items()}
    assert len({round(float(np.ravel(e[session.output_names[0]])[0]), 4) for e in expected.values()}) > 200  # answers differ
    batcher = BatcherSettings(max_batch=3, max_queue_delay_ms=0.0, workers=2)
    warm_up(session, feeds_cache(spec.inputs, 0), batcher.max_batch)
    result = run_load(session, lambda b: {}, arrivals, batcher, max_seconds=60, request_feeds=own.__getitem__)
    assert result.outputs is not None and len(result.outputs) == len(arrivals) and result.abandoned == 0
    # Both workers ran inferences at once (overlapping start..end intervals), and batches formed.
    assert result.inferences >= 2 and (result.batch > 1).any()
    batches = sorted(set(zip(result.start_s.tolist(), result.end_s.tolist())))
    overlaps = sum(b[0] < a[1] for a, b in zip(batches, batches[1:]))
    assert overlaps > 0, "the two workers never ran an inference at the same time: the test proves nothing"
    wrong = []
    for i, got in result.outputs.items():
        for name in session.output_names:
            if got[name].shape != expected[i][name].shape or not np.allclose(got[name], expected[i][name], rtol=1e-3, atol=1e-4):
                wrong.append((i, name))
    assert not wrong, f"{len(wrong)} of {len(arrivals)} requests got another answer than their own input's: {wrong[:5]}"


class OneAtATime:
    """A session that declares it runs one inference at a time."""

    input_names = ["input"]
    output_names = ["output"]
    max_concurrent = 1

    def infer(self, feeds):
        return {"output": np.zeros((len(feeds["input"]), 1), np.float32)}


def test_workers_beyond_what_the_session_declares_are_refused():
    arrivals = poisson_arrivals(100.0, 5, {1: 1.0}, seed=0)
    feeds = {1: {"input": np.zeros((1, 1), np.float32)}}
    with pytest.raises(KilnError, match=r"serving.workers is 2.*at most 1 inference at once.*serving.workers: 1"):
        run_load(OneAtATime(), feeds.__getitem__, arrivals, BatcherSettings(1, 0.0, workers=2), 5)
    assert run_load(OneAtATime(), feeds.__getitem__, arrivals, BatcherSettings(1, 0.0, workers=1), 5).abandoned == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("kiln-serving")]


def test_instance_pool_gives_each_caller_its_own_instance():
    pool = InstancePool(object)
    with pool.take() as a, pool.take() as b:
        assert a is not b
    with pool.take() as c:
        assert c in (a, b)  # reused, not made again
    assert pool.made == 2
