"""Benchmark the Ray executor against the local executor: whole `headstudy ships` processes, same scan.

Each configuration is one fresh process (`headstudy ships ... --out <new folder>`, so nothing is reused from
an earlier run), timed from start to exit: interpreter, Ray start, model loading in every actor, the scan,
the tables. Configurations:

- local          `--executor local`: one process, torch on every core
- ray-fill       `--executor ray`: a local Ray cluster, one one-thread actor per core (fills the machine)
- ray-1          `--executor ray --actors 1`: one one-thread actor
- ray-2          `--executor ray --actors 2`: two one-thread actors

Reported: wall seconds of each, the Ray overhead (ray-fill / local - 1; target <= 15 %) and the scaling of two
one-thread actors over one (ray-1 / ray-2; target >= 1.7x).

    python bench/bench_ray.py --prompts 8            # the embedded SmolLM2, 270 heads x 8 prompts
    python bench/bench_ray.py --prompts 8 --repeat 2 --json bench.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "local": ["--executor", "local"],
    "ray-fill": ["--executor", "ray"],
    "ray-1": ["--executor", "ray", "--actors", "1"],
    "ray-2": ["--executor", "ray", "--actors", "2"],
}
OVERHEAD_TARGET = 0.15
SCALING_TARGET = 1.7


def timed(argv: list[str], out: Path, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "study.cli", *argv, "--out", str(out)], stdout=subprocess.DEVNULL,
                              stderr=err)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}); see {log}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (the best is reported)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which configurations, comma-separated")
    ap.add_argument("--json", default=None, help="append the figures as one JSON line")
    args = ap.parse_args()
    scan = ["ships", "--limit", str(args.prompts)]
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    times: dict[str, float] = {}
    try:
        # one warm-up run converts the embedded model into the cache, outside every timing
        timed(["ships", "--limit", "1", "--executor", "local"], work / "warm", work / "warm.log")
        for name in args.configs.split(","):
            best = min(timed([*scan, *CONFIGS[name]], work / f"{name}-{i}", work / f"{name}-{i}.log")
                       for i in range(args.repeat))
            times[name] = best
            print(f"{name:<9} {best:8.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = 270 * args.prompts
    figures: dict[str, object] = dict(cpus=os.cpu_count(), prompts=args.prompts, rows=rows, seconds=times)
    if "local" in times and "ray-fill" in times:
        overhead = times["ray-fill"] / times["local"] - 1
        figures["ray_overhead"] = overhead
        print(f"Ray overhead (ray-fill vs local, whole process): {overhead:+.1%}  "
              f"{'PASS' if overhead <= OVERHEAD_TARGET else 'MISS'} (target <= {OVERHEAD_TARGET:.0%})")
    if "ray-1" in times and "ray-2" in times:
        scaling = times["ray-1"] / times["ray-2"]
        figures["scaling_2_over_1"] = scaling
        print(f"scaling, two one-thread actors over one: {scaling:.2f}x  "
              f"{'PASS' if scaling >= SCALING_TARGET else 'MISS'} (target >= {SCALING_TARGET}x)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
