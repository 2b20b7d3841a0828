"""The report's tuning, throughput, roofline and costs sections, and the noisy mark, from hand-made run records."""

from __future__ import annotations

from test_serving_and_report import run_record

from kiln.report import render, summary_csv, summary_rows
from kiln.report_tuning import roofline

FACTS = {
    "cores": 2,
    "clock": {"hz": 3.5e9, "source": "measured: dependent-add loop"},
    "peaks": {
        "fp32": {"macs_per_s": 100e9, "runtime": "onnxruntime", "isa_macs_per_s": 224e9},
        "int8": {"macs_per_s": 300e9, "runtime": "openvino", "isa_macs_per_s": 896e9},
    },
    "preflight": ["int8: this CPU has no VNNI"],
}


ROOF = {"macs_per_image": 2.0e9, "by_op": {"Conv": 1.9e9, "Gemm": 0.1e9}, "uncounted": [], "machine": FACTS}


def results(roof=ROOF):
    fp32 = run_record("fp32", 40.0)  # 25 images/s x 2 GMAC = 50 GMAC/s: half the fp32 peak
    int8 = run_record("int8", 5.0)  # 200 images/s x 2 GMAC = 400 GMAC/s: above the measured int8 peak
    fp32["run"]["roofline"] = int8["run"]["roofline"] = roof
    int8["run"]["precision"] = {"requested": "int8", "executed": "int8"}
    int8["run"]["latency"]["b8"]["noisy"] = True
    int8["run"]["throughput"] = {"batch": 8, "images_per_s": 250.0, "requests_in_flight": 2, "method": "AsyncInferQueue"}
    int8["run"]["tuning"] = {
        "batch": 8,
        "knobs": {"num_streams": [None, 1, 2]},
        "trials": [{"set": {"num_streams": 1}, "won": True}, {"set": {"num_streams": 2}, "won": False}],
        "changed": {"num_streams": 1},
        "default_ms_per_image": 5.5,
        "tuned_ms_per_image": 5.0,
        "speedup": 1.1,
        "seconds": 12.3,
    }
    int8["run"]["costs"] = {
        "peak_rss_mb": 512.0,
        "added_mb": 300.0,
        "engine_mb": 12.5,
        "load_s": 0.4,
        "first_infer_ms": 30.0,
        "build_s": 2.0,
        "tuning_s": 12.3,
        "memory_method": "VmHWM after resetting it",
    }
    fp32["run"]["throughput"] = {"batch": 8, "images_per_s": None, "why": "the runtime offers no concurrent mode"}
    return {"fp32": fp32, "int8": int8}


def test_roofline_raises_a_peak_an_engine_exceeds_and_says_so():
    achieved = roofline(results())
    assert achieved["fp32"]["pct_of_peak"] == 50.0 and not achieved["fp32"]["peak_raised"]
    # int8: 400 GMAC/s sync, 500 in throughput mode, against a measured 300: the peak becomes 500.
    assert achieved["int8"]["peak_raised"] and achieved["int8"]["peak_macs_per_s"] == 500e9
    assert achieved["int8"]["pct_of_peak"] == 80.0 and achieved["int8"]["throughput_pct_of_peak"] == 100.0
    assert roofline(results(None)) == {}


def test_sections_show_tuning_throughput_roofline_costs_and_noise():
    md = render(results(), None, "fp32")
    assert "| int8 | 8 | 5.500 | 5.000 | 1.10x | num_streams=1 | 2 | 12.3 |  |" in md
    assert "| int8 | 8 | 200.0 | 250.0 | 1.25x | 2 | AsyncInferQueue |" in md
    assert "| fp32 | 8 | 25.0 | n/a | | | the runtime offers no concurrent mode |" in md
    assert "The model does 2.000 GMAC per image (Conv 1.900, Gemm 0.100" in md
    assert "| int8 | 300 | openvino | 896 | 0.33 |" in md
    assert "| fp32 | fp32 | 50 | 50 |" in md and "| int8 | int8 | 400 | 80 | 500 | 100 (peak raised to this) |" in md
    assert "Pre-flight: int8: this CPU has no VNNI" in md
    assert "| int8 | 512 | 300 | 12.5 | 0.40 | 30.0 | 2.0 | 12.3 |" in md and "VmHWM after resetting it" in md
    assert "| 8 (opt) | 40.000~ |" in md  # the noisy batch's p50 is marked
    rows = summary_rows(results(), "fp32", roofline(results()))
    assert summary_csv(rows).splitlines()[2].endswith(",250.0,512.0,80.0")


def test_sections_are_left_out_without_their_data():
    md = render({"fp32": run_record("fp32", 40.0)}, None, "fp32")
    for section in ("## Tuning", "## Throughput mode", "## Roofline", "## What each engine costs"):
        assert section not in md
