"""Wall time of the default test run (what CI runs) from a cold start: empty XLA compilation cache
and empty data directory, as on a fresh clone.

  python -m benchmarks.test_suite_time [--workers=2,0] [--repeats=1]

Each run is `python -m pytest -q -n W` with JAX_COMPILATION_CACHE_DIR and FTJAX_DATA_DIR pointed
at new temporary directories (W = 0: one process). Writes test_suite_time.json beside this file
and appends a table to RESULTS.md. Run it on an idle machine: a busy neighbour slows it severalfold.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import machine, record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cold_run(workers):
  """(wall seconds, pytest's summary line, exit code) of one cold default test run."""
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, "jax_cache"),
               FTJAX_DATA_DIR=os.path.join(tmp, "data"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-n", str(workers)], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
  lines = [l for l in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)", l)]
  return wall, (lines[-1].strip("= ") if lines else proc.stdout[-300:]), proc.returncode


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workers", default="2", help="Comma-separated pytest-xdist worker counts.")
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args(argv)
  results = []
  for w in [int(x) for x in args.workers.split(",")]:
    walls, summary, rc = [], "", 0
    for _ in range(args.repeats):
      wall, summary, rc = cold_run(w)
      walls.append(wall)
      print(f"workers={w}: {wall:.0f} s, {summary}, exit {rc}", flush=True)
    results.append({"workers": w, "wall_s": walls, "median_s": statistics.median(walls),
                    "summary": summary, "exit_code": rc})
  with open(os.path.join(REPO, "benchmarks", "test_suite_time.json"), "w", encoding="utf-8") as f:
    json.dump({"machine": machine(), "results": results}, f, indent=1)
  table = ("| pytest-xdist workers | wall (s), median | runs (s) | result | exit |\n"
           "|---|---|---|---|---|\n")
  table += "\n".join(f"| {r['workers']} | {r['median_s']:.0f} | "
                     f"{', '.join(f'{w:.0f}' for w in r['wall_s'])} | {r['summary']} | "
                     f"{r['exit_code']} |" for r in results)
  record("Default test run from a cold compilation cache", table,
         "Cold: empty XLA compilation cache and data directory, as on CI's fresh clone; "
         "pip install not included.")


if __name__ == "__main__":
  main()
