"""How many samples the main job's shared-Z test needs: its power at the main job's checkpoints.

  python -m experiments.main_job_power --run=runs/main_job/seed0 [--run=...] \
      --out=experiments/results/main_job/power.csv [--designs=8x6,16x8,32x8] [--repeats=5]
  python -m experiments.main_job_power --summarize=experiments/results/main_job/power.csv

For each run's final checkpoint and each design (Z draws × samples per draw), draws --repeats
fresh sample sets (sampling seeds 1, 2, ...; the main job itself used seed 0) and runs
`ftjax.zdiag.shared_z_tests` on each. One row per (run, design, sampling seed): within/across
agreement and p for the same block position, the distance between block starts and the '!'
overlap, and the sampling wall time. Then <out>_summary.csv, per (run, design): how many sets pass
each test and any of them at p < 0.05 / 3 (0.05 shared by the three tests, Bonferroni, as in
experiments/studies/main_job.md), an estimate of each test's power on that model, and the median
of each p.
"""

import argparse
import csv
import os
import time

import numpy as np

from experiments.kappa_results import write_csv
from experiments.main_job_curve import TESTS, shared_z_columns

ALPHA = 0.05 / len(TESTS)  # per test: 0.05 over the three tests (Bonferroni)


def summarize(rows):
  """Per (run, design): sets passing each test and any at p < ALPHA, and the median p's."""
  out = []
  for key in dict.fromkeys((r["run"], int(r["num_z"]), int(r["per_z"])) for r in rows):
    rs = [r for r in rows if (r["run"], int(r["num_z"]), int(r["per_z"])) == key]
    p_TS = np.array([[float(r[f"{t}_p"]) for r in rs] for t in TESTS])
    out.append({"run": key[0], "num_z": key[1], "per_z": key[2], "samples": key[1] * key[2],
                "sets": len(rs), "alpha_per_test": ALPHA,
                **{f"{t}_passes": int(np.sum(p_S < ALPHA)) for t, p_S in zip(TESTS, p_TS)},
                "any_passes": int(np.sum(p_TS.min(0) < ALPHA)),
                **{f"{t}_p_median": float(np.median(p_S)) for t, p_S in zip(TESTS, p_TS)},
                "sampling_wall_s_median": float(np.median([float(r["sampling_wall_s"])
                                                           for r in rs]))})
  return out


def sample_sets(runs, designs, repeats, draws):
  from ftjax import zdiag
  from ftjax.trainer import load_run
  rows = []
  for run in runs:
    trainer, state = load_run(run)
    for num_z, per_z in designs:
      for seed in range(1, repeats + 1):
        start = time.perf_counter()
        texts, groups = zdiag.shared_z_samples(trainer, state.params, num_z, per_z, seed)
        wall = time.perf_counter() - start
        tests = zdiag.shared_z_tests(texts, groups, draws=draws)
        row = {"run": os.path.basename(os.path.normpath(run)), "num_z": num_z, "per_z": per_z,
               "sampling_seed": seed, "sampling_wall_s": wall, **shared_z_columns(tests)}
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", action="append", default=[])
  parser.add_argument("--out", help="power.csv to write (with --run).")
  parser.add_argument("--summarize", help="An existing power.csv: only rewrite its summary.")
  parser.add_argument("--designs", default="8x6,16x8,32x8", help="Comma-separated NUM_ZxPER_Z.")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--draws", type=int, default=10000, help="Permutations per test.")
  args = parser.parse_args(argv)
  if args.summarize:
    out = args.summarize
    with open(out, encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
  else:
    if not (args.run and args.out):
      parser.error("give --run (one or more) and --out, or --summarize=power.csv")
    try:
      designs = [tuple(int(x) for x in d.split("x")) for d in args.designs.split(",")]
    except ValueError:
      parser.error("--designs takes NUM_ZxPER_Z,..., e.g. 8x6,16x8")
    out = args.out
    rows = sample_sets(args.run, designs, args.repeats, args.draws)
    write_csv(out, rows)
  summary = summarize(rows)
  path = os.path.splitext(out)[0] + "_summary.csv"
  write_csv(path, summary)
  for s in summary:
    passes = ", ".join(f"{t} {s[f'{t}_passes']}" for t in (*TESTS, "any"))
    medians = " / ".join(f"{s[f'{t}_p_median']:.3f}" for t in TESTS)
    print(f"{s['run']:15s} {s['num_z']}x{s['per_z']}: sets passing of {s['sets']} at "
          f"p < {ALPHA:.4f}: {passes}; median p {medians}")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
