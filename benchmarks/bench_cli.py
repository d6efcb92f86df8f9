"""Benchmark the command line's start-up: ``moe-protocols --help`` and friends, in new processes.

Run: ``.venv/bin/python benchmarks/bench_cli.py`` (add ``--quick`` for a fast smoke run).

Each figure is the median wall time of a fresh interpreter running the
command, interleaved with the baseline (``python -c pass``, the interpreter's
own start-up) so that machine noise hits both alike; the ratio says what the
command adds on top. The goal is ``--help`` under one second: it imports
neither torch nor the engine. For contrast the last row is ``import torch``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Final

CASES: Final = {
    "python -c pass (baseline)": ["-c", "pass"],
    "moe-protocols --help": ["-m", "moe_protocols", "--help"],
    "moe-protocols --version": ["-m", "moe_protocols", "--version"],
    "moe-protocols profile --help": ["-m", "moe_protocols", "profile", "--help"],
    "import moe_protocols": ["-c", "import moe_protocols"],
    "import torch (for contrast)": ["-c", "import torch"],
}


def _seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 15
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(repeats):
        for name, argv in CASES.items():
            times[name].append(_seconds(argv))
    base = statistics.median(times["python -c pass (baseline)"])
    print(f"{'command':<32} {'median ms':>10} {'x baseline':>11}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<32} {median * 1e3:>10.1f} {median / base:>11.2f}")
    help_median = statistics.median(times["moe-protocols --help"])
    verdict = "met" if help_median < 1.0 else "NOT met"
    print(f"goal --help < 1 s: {verdict} ({help_median:.3f} s median of {repeats})")


if __name__ == "__main__":
    main()
