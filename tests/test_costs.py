"""What an engine costs: peak memory over a span, size on disk, cold start."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import venv_env

from kiln.measure import costs
from kiln.measure.costs import MemoryWatch, cold_start, engine_size_bytes


def clear_refs_works() -> bool:
    with MemoryWatch() as watch:
        pass
    return watch.result()["span_peak"]


def in_a_fresh_process(body: str) -> dict:
    """Run `body` (it sets `out`) in a new interpreter: what a span adds is measured against a process nothing else has
    used. In a pytest-xdist worker that had run other files, the same 200 MiB block read 0 and 150 MB added in CI
    (twice in five runs, never alone): memory already resident, or freed beside the span, moves RSS with it."""
    code = "import gc, json, threading\nimport numpy as np\nfrom kiln.measure.costs import MemoryWatch\n"
    code += textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    done = subprocess.run([sys.executable, "-c", code], env=venv_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_memory_watch_sees_an_allocation():
    result = in_a_fresh_process(
        """
        with MemoryWatch() as watch:
            block = np.ones(200 * 2**20 // 8)  # 200 MiB, every page touched
            del block
        out = watch.result()
        """
    )
    assert result["added_mb"] >= 180 and result["peak_rss_mb"] >= result["added_mb"]
    assert set(result) == {"rss_before_mb", "peak_rss_mb", "added_mb", "span_peak", "method"}
    assert result["method"] == (costs.SPAN_METHOD if result["span_peak"] else costs.LIFETIME_METHOD)


def test_garbage_from_before_the_watch_does_not_hide_its_peak():
    # Garbage in a reference cycle (a model, a session) is freed when the collector runs: inside the span, that fall
    # in RSS would cancel the span's own allocation (it read 0 MB added for a 200 MiB block before the watch collected).
    result = in_a_fresh_process(
        """
        cycle = [np.ones(200 * 2**20 // 8)]
        cycle.append(cycle)
        del cycle
        with MemoryWatch() as watch:
            gc.collect()  # a collection the allocations inside the span trigger
            block = np.ones(200 * 2**20 // 8)
            del block
        out = watch.result()
        """
    )
    assert result["added_mb"] >= 180


def test_memory_watch_counts_other_threads():
    result = in_a_fresh_process(
        """
        def allocate():
            block = np.ones(120 * 2**20 // 8)
            del block

        with MemoryWatch() as watch:
            worker = threading.Thread(target=allocate)
            worker.start()
            worker.join()
        out = watch.result()
        """
    )
    assert result["added_mb"] >= 100


@pytest.mark.skipif(not clear_refs_works(), reason="/proc/self/clear_refs cannot reset VmHWM here (not Linux >= 4.0, or forbidden)")
def test_a_later_watch_does_not_report_an_earlier_peak():
    result = in_a_fresh_process(
        """
        with MemoryWatch():
            block = np.ones(200 * 2**20 // 8)
            del block
        with MemoryWatch() as watch:
            small = np.ones(2**20 // 8)  # 1 MiB
            del small
        out = watch.result()
        """
    )
    assert result["span_peak"] and result["method"] == costs.SPAN_METHOD
    assert result["added_mb"] < 50 and result["peak_rss_mb"] - result["rss_before_mb"] < 50


@pytest.mark.skipif(not clear_refs_works(), reason="/proc/self/clear_refs cannot reset VmHWM here (not Linux >= 4.0, or forbidden)")
def test_a_nested_watch_does_not_hide_the_outer_peak():
    outer, inner = in_a_fresh_process(
        """
        with MemoryWatch() as outer:
            block = np.ones(200 * 2**20 // 8)
            del block
            with MemoryWatch() as inner:  # resets the high-water mark the outer watch reads
                pass
        out = [outer.result(), inner.result()]
        """
    )
    assert outer["added_mb"] >= 180 and inner["added_mb"] < 50


def test_fallback_without_clear_refs(monkeypatch, tmp_path):
    monkeypatch.setattr(costs, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    with MemoryWatch() as watch:
        pass
    result = watch.result()
    assert result["span_peak"] is False and result["method"] == costs.LIFETIME_METHOD
    assert result["peak_rss_mb"] > 0 and result["added_mb"] >= 0


def test_result_before_the_block_ends_is_refused():
    with MemoryWatch() as watch:
        with pytest.raises(RuntimeError, match="after the `with` block"):
            watch.result()


def test_engine_size_bytes(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x" * 1000)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.bin").write_bytes(b"y" * 234)
    (tmp_path / "manifest.json").write_text("{}" * 100)
    assert engine_size_bytes(tmp_path) == 1234
    assert engine_size_bytes(tmp_path, exclude=()) == 1434
    assert engine_size_bytes(tmp_path, exclude=("weights/w.bin", "manifest.json")) == 1000


def test_cold_start_times_load_and_first_call_apart():
    calls, at = [], {}

    def load():
        at["load"] = time.perf_counter()
        time.sleep(0.05)
        at["loaded"] = time.perf_counter()
        return "session"

    def first(session):
        at["first"] = time.perf_counter()
        calls.append(session)
        time.sleep(0.02)
        at["answered"] = time.perf_counter()

    before = time.perf_counter()
    loaded, timing = cold_start(load, first)
    after = time.perf_counter()
    assert loaded == "session" and calls == ["session"]
    assert set(timing) == {"load_s", "first_infer_ms"}
    # Each figure spans its own call and nothing of the other's, measured against the same clock in this run
    # (no bound on how long a busy machine takes).
    assert at["loaded"] - at["load"] <= timing["load_s"] <= at["first"] - before
    assert (at["answered"] - at["first"]) * 1e3 <= timing["first_infer_ms"] <= (after - at["loaded"]) * 1e3
