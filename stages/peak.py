"""peak: this machine's peak multiply-accumulates per second per precision, measured, for the report's roofline.

Large GEMMs through the runtimes themselves (kiln.measure.peak), the core clock measured with a dependent-add loop,
and the ISA's bound from both. Depends on the fingerprint only: it re-runs when the machine changes, and a
measurement taken on a quiet machine is kept per fingerprint for other clones (kiln.measure.peak_cache).
"""

import logging

from kiln.config.views import default_threads
from kiln.core import paths
from kiln.core.atomic import write_json
from kiln.measure import peak_cache
from kiln.measure.machine_load import LoadWatch
from kiln.measure.peak import isa_peak, machine_peaks, measure_clock_hz, measure_peaks, preflight_notes
from kiln.pipeline.stage import run_stage
from kiln.runtimes import fingerprint


def main() -> None:
    log = logging.getLogger("kiln.measure.peak")
    machine = paths.FINGERPRINT.read_text(encoding="utf-8")
    cached = peak_cache.load(machine)
    if cached:
        log.info("this machine's roof as measured before, reused from %s (delete it to measure again)", cached["reused_from"])
        write_json(paths.PEAK, cached)
        return
    cpu = fingerprint.collect()["hardware"]["cpu"]
    cores = default_threads()
    with LoadWatch() as load:
        measured = measure_peaks(threads=cores)
        clock = measure_clock_hz()
    isa = isa_peak(cpu["features"], cores, clock["hz"])
    facts = {
        "cpu": cpu,
        "cores": cores,
        "clock": clock,
        "measured": measured,
        "isa": isa,
        "peaks": machine_peaks(measured, isa),
        "preflight": preflight_notes(cpu["features"]),
    }
    facts["load"] = load.to_dict()
    for precision, peak in facts["peaks"].items():
        if peak.get("macs_per_s"):
            log.info("%s: %.0f GMAC/s measured (%s)", precision, peak["macs_per_s"] / 1e9, peak.get("runtime"))
    for note in facts["preflight"]:
        log.warning("%s", note)
    if load.busy:
        log.warning(
            "other work ran beside the measurement (%s): this roof may be low, and it is not kept for "
            "other clones; `dvc repro --force peak` on a quiet machine measures it again",
            load.describe(),
        )
    write_json(paths.PEAK, facts)
    kept = peak_cache.store(machine, facts, load.busy)
    if kept:
        log.info("kept for other clones on this machine: %s", kept)


if __name__ == "__main__":
    run_stage(main)
