"""peak: this machine's peak multiply-accumulates per second per precision, measured, for the report's roofline.

Large GEMMs through the runtimes themselves (kiln.peak), the core clock measured with a dependent-add loop,
and the ISA's bound from both. Depends on the fingerprint only: it re-runs when the machine changes.
"""

import logging

from kiln import fingerprint, paths
from kiln.atomic import write_json
from kiln.config import default_threads
from kiln.peak import isa_peak, machine_peaks, measure_clock_hz, measure_peaks, preflight_notes
from kiln.stage import run_stage


def main() -> None:
    log = logging.getLogger("kiln.peak")
    cpu = fingerprint.collect()["hardware"]["cpu"]
    cores = default_threads()
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
    for precision, peak in facts["peaks"].items():
        if peak.get("macs_per_s"):
            log.info("%s: %.0f GMAC/s measured (%s)", precision, peak["macs_per_s"] / 1e9, peak.get("runtime"))
    for note in facts["preflight"]:
        log.warning("%s", note)
    write_json(paths.PEAK, facts)


if __name__ == "__main__":
    run_stage(main)
