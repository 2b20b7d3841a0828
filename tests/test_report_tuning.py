"""The report's tuning, throughput, roofline and costs sections, and the noisy mark, from hand-made run records."""

from __future__ import annotations

from mdtables import assert_row
from mdtables import rows as table_rows
from test_serving_and_report import run_record

from kiln.report.markdown import render, summary_csv, summary_rows
from kiln.report.tuning import roofline

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
    # Tuning: default and tuned ms/image, the speed-up, the winner, the trials and the seconds.
    assert_row(md, "int8", 5.5, 5.0, 1.1, "num_streams=1", 12.3)
    # Throughput mode: sync against concurrent images/s, their ratio, requests in flight, and how; or why not.
    assert_row(md, "int8", 200.0, 250.0, 1.25, "AsyncInferQueue")
    assert_row(md, "fp32", 25.0, "the runtime offers no concurrent mode")
    # Roofline: the model's MACs per image, the measured peak against the ISA's, and each engine's share of the peak.
    assert "2.000 GMAC" in md and "Conv 1.900" in md and "Gemm 0.100" in md
    assert_row(md, "int8", 300, "openvino", 896, 0.33)
    assert_row(md, "fp32", "fp32", 50, 50)
    raised = assert_row(md, "int8", "int8", 400, 80, 500, 100)
    assert any("raised" in cell for cell in raised)  # the int8 engine beat the measured peak: said on its row
    assert "int8: this CPU has no VNNI" in md
    # Costs: peak and added memory, engine size, load, first inference, build and tuning time, and how memory was read.
    assert_row(md, "int8", 512, 300, 12.5, 0.4, 30.0, 2.0, 12.3) and "VmHWM after resetting it" in md
    # The noisy batch's p50 is marked, and only that one.
    noisy = [cells for cells in table_rows(md, "int8") if any(c.startswith("8 (opt)") for c in cells)]
    assert noisy and any(c.startswith("40.000") and c != "40.000" for c in noisy[0])
    assert not any(c.startswith("160.000") and c != "160.000" for cells in table_rows(md, "int8") for c in cells)
    rows = summary_rows(results(), "fp32", roofline(results()))
    assert summary_csv(rows).splitlines()[2].endswith(",250.0,512.0,80.0")


def test_sections_are_left_out_without_their_data():
    md = render({"fp32": run_record("fp32", 40.0)}, None, "fp32")
    for section in ("## Tuning", "## Throughput mode", "## Roofline", "## What each engine costs"):
        assert section not in md
