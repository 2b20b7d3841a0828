"""How close kiln's engines get to what this chip can do, after `dvc repro` of the default pipeline (ResNet-18).

Prints, measured in this one run on this machine:
1. kiln's fastest CPU targets at batch 8 (sync and throughput mode) against OpenVINO's own benchmark_app
   (latency and throughput hints) on kiln's openvino-int8 IR;
2. each tuned target against its untuned default, in interleaved rounds (ratio and spread);
3. the best int8 engine's MAC/s against the measured int8 peak (artifacts/peak.json);
4. what tuning added to the pipeline (the manifests' tuning seconds).

    python benchmarks/chip.py [--seconds 10] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def benchmark_app(ir: Path, batch: int, hint: str, seconds: float) -> float:
    """images/s that OpenVINO's benchmark_app reports for `ir` at `batch` with a performance hint."""
    exe = Path(sys.executable).with_name("benchmark_app")
    shape = "[{},3,224,224]".format(batch)
    out = subprocess.run(
        [
            str(exe),
            "-m",
            str(ir),
            "-d",
            "CPU",
            "-hint",
            hint,
            "-shape",
            shape,
            "-t",
            str(max(1, round(seconds))),
            "-infer_precision",
            "f32",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(re.search(r"Throughput:\s+([\d.]+)\s+FPS", out).group(1))  # "FPS" counts images (batch 8: 8 per inference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="timing per measurement")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    import os

    os.chdir(ROOT)
    from kiln.config.views import Target, load_params
    from kiln.core import paths
    from kiln.data.engine_input import engine_spec
    from kiln.data.inputs import make_inputs
    from kiln.measure.benchmark import BenchmarkSettings, latency_stats, time_infer
    from kiln.measure.roofline import count_macs
    from kiln.measure.tuning import TuningSettings, _Candidate, _Timer, with_settings
    from kiln.pipeline.engine import load_engine, read_manifest
    from kiln.runtimes import ThroughputSession, get_runtime
    from kiln.runtimes.fingerprint import collect, describe_hardware

    params = load_params()
    spec = engine_spec(params)
    feeds = make_inputs(spec.inputs, args.batch, 7)
    settings = BenchmarkSettings(min_time_s=args.seconds, min_iters=20, warmup_iters=5)
    print(f"Machine: {describe_hardware(collect()['hardware'])}; batch {args.batch}; {args.seconds:g} s per measurement\n")

    sync, throughput, manifests = {}, {}, {}
    for name in params["targets"]:
        folder = paths.ENGINES / name
        if not (folder / "manifest.json").is_file() or read_manifest(folder).get("skipped"):
            continue
        target = Target.from_params(name, params)
        if target.runtime == "torch" and target.precision == "fp32":
            continue  # the fp32 torch targets are the slow baselines
        session, manifests[name] = load_engine(folder, target)
        sync[name] = latency_stats(time_infer(session, feeds, settings), args.batch)["images_per_s"]
        if isinstance(session, ThroughputSession):
            throughput[name] = session.throughput(feeds, args.seconds, 20)["images_per_s"]
        del session
    ir = paths.ENGINES / "openvino-int8" / "model.xml"
    app = {hint: benchmark_app(ir, args.batch, hint, args.seconds) for hint in ("latency", "throughput")}

    print("| what | images/s sync | images/s throughput mode |")
    print("|---|---:|---:|")
    for name in sync:
        print(f"| kiln {name} | {sync[name]:.1f} | {throughput.get(name, float('nan')):.1f} |")
    for hint, ips in app.items():
        print(f"| benchmark_app -hint {hint} (openvino-int8 IR) | | {ips:.1f} |")
    best_kiln = max([*sync.values(), *throughput.values()])
    best_app = max(app.values())
    print(f"\nGoal 1: kiln's fastest {best_kiln:.1f} images/s vs benchmark_app's best {best_app:.1f}: ratio {best_kiln / best_app:.3f}\n")

    tuning = TuningSettings(rounds=9, round_s=max(0.3, args.seconds / 20))
    print("| tuned target | winning settings | tuned / default time | spread | at least as fast |")
    print("|---|---|---:|---:|---|")
    for name, manifest in manifests.items():
        record = manifest.get("tuning")
        if not record:
            continue
        target = Target.from_params(name, params)
        changed = record.get("changed") or {}
        runtime = get_runtime(target.runtime)
        # Through the runtime directly: load_engine would apply the tuning to both.
        folder = paths.ENGINES / name
        default = _Candidate({}, target, folder, {}, runtime.load(folder, manifest, target))
        tuned = _Candidate(changed, with_settings(target, changed), folder, {})
        tuned.session = runtime.load(folder, manifest, tuned.target)
        result = _Timer(feeds, args.batch, tuning).compare(default, tuned)
        ok = result["ratio"] <= 1 + result["spread"]
        print(
            f"| {name} | {record.get('changed') or 'default kept'} | {result['ratio']:.3f} | {result['spread']:.3f} "
            f"| {'yes' if ok else 'NO'} |"
        )

    facts = json.loads(paths.PEAK.read_text()) if paths.PEAK.is_file() else {}
    macs = count_macs(paths.ONNX).per_image
    int8 = {n: max(sync[n], throughput.get(n, 0.0)) for n in sync if manifests[n]["precision"]["requested"] == "int8"}
    peak = ((facts.get("peaks") or {}).get("int8") or {}).get("macs_per_s")
    if int8 and peak:
        name = max(int8, key=int8.get)
        achieved = macs * int8[name]
        isa = facts["peaks"]["int8"].get("isa_macs_per_s")
        print(
            f"\nGoal 2: {macs / 1e9:.3f} GMAC/image; best int8 engine {name} at {achieved / 1e9:.0f} GMAC/s = "
            f"{100 * achieved / peak:.0f}% of the measured int8 peak {peak / 1e9:.0f} GMAC/s ({facts['peaks']['int8'].get('runtime')})"
            + (" (above it: the report raises the peak to the engine's figure)" if achieved > peak else "")
            + (f"; {100 * achieved / isa:.0f}% of the ISA bound {isa / 1e9:.0f} GMAC/s" if isa else "")
        )
    seconds = {n: m["tuning"]["seconds"] for n, m in manifests.items() if m.get("tuning")}
    print(
        f"\nGoal 3: tuning added {sum(seconds.values()):.0f} s to the pipeline: " + ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items())
    )


if __name__ == "__main__":
    main()
