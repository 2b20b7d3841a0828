"""kiln.measure.peak: the measured MAC/s roof, the ISA's bound and the notes said before a build."""

from __future__ import annotations

import pytest

from kiln.measure import peak
from kiln.measure.peak import isa_peak, machine_peaks, measure_clock_hz, measure_peaks, preflight_notes
from kiln.runtimes.fingerprint import collect

FEATURES = collect()["hardware"]["cpu"]["features"]
VNNI = {"avx512_vnni", "avx_vnni", "amx_int8"}


def graph_macs(case, tmp_path) -> int:
    """The multiply-accumulates of the graph a case timed, counted from that ONNX graph by kiln.measure.roofline (the
    counter the roofline's per-image figure uses), not by peak's own arithmetic."""
    import onnx

    from kiln.measure.roofline import count_macs

    graph, shape, _ = peak._model(case["op"], tuple(case["shape"]), case["precision"] == "int8")
    path = tmp_path / f"{case['runtime']}-{case['precision']}-{case['op']}.onnx"
    onnx.save(graph, str(path))
    count = count_macs(path, batch=shape[0])
    assert not count.uncounted, count
    return count.per_image * count.batch


@pytest.fixture(scope="module")
def measured():
    # One small GEMM per runtime and precision, timed briefly: the shapes and timing a report uses take ~10 s.
    return measure_peaks(seconds_per_case=0.05, precisions=("fp32", "int8"), shapes=((256, 512, 512),), convs=())


def test_measured_peaks_are_positive(measured, tmp_path):
    assert measured["precisions"]["fp32"]["macs_per_s"] > 0 and measured["precisions"]["int8"]["macs_per_s"] > 0
    assert {(c["runtime"], c["precision"]) for c in measured["cases"]} == {
        (r, p) for r in ("openvino", "onnxruntime") for p in ("fp32", "int8")
    }
    for case in measured["cases"]:
        assert "error" not in case, case
        assert case["median_ms"] > 0 and case["calls"] >= 3
        # MAC/s: the graph's multiply-accumulates over the median time of one call.
        assert case["macs_per_s"] == pytest.approx(graph_macs(case, tmp_path) / (case["median_ms"] / 1e3), rel=1e-9)
    # Each case was timed for at least its 0.05 s, and half its calls took at least the median: both within the total.
    assert measured["threads"] >= 1 and measured["seconds"] >= 0.05 * len(measured["cases"])
    assert measured["seconds"] >= sum(c["calls"] * c["median_ms"] / 2e3 for c in measured["cases"])
    # Each precision's peak is its fastest counted case.
    for precision, best in measured["precisions"].items():
        counted = [c for c in measured["cases"] if c["precision"] == precision and c["counted"]]
        assert best["macs_per_s"] == max(c["macs_per_s"] for c in counted)


@pytest.mark.skipif(not VNNI & set(FEATURES), reason="this CPU has no VNNI: OpenVINO may run the QDQ MatMul in f32 here")
def test_int8_really_ran_in_int8(measured):
    executed = {c["runtime"]: c["executed"] for c in measured["cases"] if c["precision"] == "int8"}
    assert executed["openvino"] in ("u8", "i8"), executed  # the FullyConnected's runtimePrecision
    assert executed["onnxruntime"].startswith("int8 ("), executed  # QDQ fused into an integer kernel
    assert all(c["counted"] for c in measured["cases"])


@pytest.mark.skipif(not VNNI & set(FEATURES), reason="this CPU has no VNNI: the runtimes may run the QDQ convolution in f32 here")
def test_an_int8_convolution_with_a_quantized_output_runs_as_one_int8_kernel(tmp_path):
    # The output's QuantizeLinear is what lets ONNX Runtime fuse the convolution (QLinearConv); MACs: B*C*HW*HW*C*9.
    result = measure_peaks(seconds_per_case=0.02, precisions=("int8",), shapes=(), convs=((1, 32, 8),))
    executed = {c["runtime"]: c["executed"] for c in result["cases"]}
    assert executed == {"openvino": executed["openvino"], "onnxruntime": "int8 (QLinearConv)"} and executed["openvino"] in ("u8", "i8")
    for case in result["cases"]:
        assert case["op"] == "conv" and case["macs_per_s"] == pytest.approx(
            graph_macs(case, tmp_path) / (case["median_ms"] / 1e3), rel=1e-9
        )


def test_a_case_that_ran_in_another_precision_is_not_counted(monkeypatch):
    monkeypatch.setattr(peak, "_openvino", lambda precision, *_: (lambda: None, "f32"))  # int8 asked, f32 ran
    monkeypatch.setattr(peak, "_onnxruntime", lambda precision, *_: (lambda: None, "bf16 (1/2), f32 (1/2)"))
    result = measure_peaks(seconds_per_case=0.01, precisions=("fp32", "int8"), shapes=((8, 8, 8),), convs=())
    assert list(result["precisions"]) == ["fp32"] and result["precisions"]["fp32"]["runtime"] == "openvino"
    assert [c["counted"] for c in result["cases"]] == [True, False, False, False]


def test_isa_peak_by_hand():
    avx512 = isa_peak(["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"], cores=4, clock_hz=2e9)
    assert avx512["fp32"]["macs_per_s"] == 2 * 16 * 4 * 2e9  # 2 FMA units x 16 lanes
    assert avx512["int8"]["macs_per_s"] == 2 * 64 * 4 * 2e9 and "vpdpbusd" in avx512["int8"]["instruction"]
    assert avx512["bf16"]["macs_per_s"] is None
    assert "2 vector FMA" in avx512["fp32"]["assumes"]
    amx = isa_peak(["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"], cores=2, clock_hz=3e9)
    assert amx["bf16"]["macs_per_s"] == 1024 * 2 * 3e9 and amx["int8"]["macs_per_s"] == 2048 * 2 * 3e9
    avx2 = isa_peak(["avx2", "fma"], cores=1, clock_hz=1e9)
    assert avx2["fp32"]["macs_per_s"] == 16e9 and avx2["int8"]["macs_per_s"] == 32e9  # vpmaddubsw+vpmaddwd: half of 2 x 32
    assert isa_peak(["avx2", "fma", "avx_vnni"], cores=1, clock_hz=1e9)["int8"]["macs_per_s"] == 64e9
    assert isa_peak(["avx512f", "avx512bw"], cores=1, clock_hz=1e9)["int8"]["macs_per_s"] == 64e9
    assert isa_peak(["avx512f", "avx512_bf16"], cores=1, clock_hz=1e9)["bf16"]["macs_per_s"] == 64e9
    no_clock = isa_peak(["avx512f"], cores=2, clock_hz=None)["fp32"]
    assert no_clock["macs_per_s"] is None and no_clock["macs_per_cycle_per_core"] == 32


def test_preflight_notes():
    notes = preflight_notes(["avx2", "fma", "avx512f", "avx512bw"])
    assert len(notes) == 2
    assert notes[0].startswith("int8") and "AVX-512BW" in notes[0] and "little or no speed-up over fp32" in notes[0]
    assert notes[1].startswith("bf16") and "slower than fp32" in notes[1]
    assert preflight_notes(["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"]) == []
    assert preflight_notes(["avx2", "fma", "avx_vnni", "amx_bf16"]) == []


def test_machine_peaks_joins_measured_and_isa():
    measured = {"precisions": {"fp32": {"macs_per_s": 50e9, "runtime": "openvino", "shape": [1, 1, 1], "executed": "f32"}}}
    joined = machine_peaks(measured, isa_peak(["avx2", "fma", "avx512f", "avx512_vnni"], cores=2, clock_hz=2.5e9))
    assert joined["fp32"] == {"macs_per_s": 50e9, "runtime": "openvino", "executed": "f32", "isa_macs_per_s": 160e9, "ratio": 50e9 / 160e9}
    assert joined["int8"]["macs_per_s"] is None and joined["int8"]["ratio"] is None
    assert joined["bf16"]["isa_macs_per_s"] is None


def test_clock(monkeypatch):
    clock = measure_clock_hz()
    assert 0.5e9 <= clock["hz"] <= 7e9, clock
    monkeypatch.setattr(peak.shutil, "which", lambda name: None)  # no compiler: the kernel's figure, and says so
    fallback = measure_clock_hz()
    assert "cpuinfo" in fallback["source"] and (fallback["hz"] is None or 0.1e9 < fallback["hz"] < 10e9)
