"""What the README's main job measured, per run (seed): its eval curve and the shared-Z sample test.

  python -m experiments.main_job_curve --run=runs/synthetic_z [--run=runs/synthetic_z_seed1 ...] \
      --out=experiments/results/main_job [--wall_s=NAME=SECONDS ...] [--machine="2-core CPU, idle"]

For each run, under --out/<run's directory name>/: curve.csv (the eval rows: eval_ce, eval_elbo,
KL in bits, the decoder's use of Z, the I(X; Z) estimate, active bits; plus the train rows'
tokens/s) and zsamples.json (ftjax.zdiag.shared_z_samples from the run's final
checkpoint: groups; within and across groups, the share of pairs with the same block position, the
mean distance between block starts and the overlap of their '!' positions, with permutation
p-values; how many samples have their letter's block, the spread (standard deviation) of their
block starts against the data's, and how many are well-formed).
Then --out/summary.csv, one row per run with the final eval row, the mean train-batch KL over the
logged steps of the second half (against the controller's target) and the shared-Z tests. --wall_s
records a measured wall time for the run whose directory is named NAME.
"""

import argparse
import json
import math
import os

import numpy as np

from experiments.kappa_results import LOG2, write_csv
from ftjax.metrics import read_rows

# The shared-Z test's design: 16 Z draws × 8 samples (zdiag's default; 8 × 6 before the power
# study of experiments/main_job_power.py).
NUM_Z, PER_Z = 16, 8
TESTS = ("position", "distance", "noise")  # zdiag.shared_z_tests'
# Their results as columns of summary.csv.
TEST_COLUMNS = [f"{name}_{k}" for name in TESTS for k in ("within", "across", "p")]


def read_curves(run):
  """(the run's eval rows (KL and I(X; Z) in bits) with the tokens/s of the train row at that
  step, the mean train-batch KL in bits over the logged steps of the second half of training)."""
  rows, speed, train_kl = [], {}, {}
  for r in read_rows(run):
    if "tokens_per_sec" in r:
      speed[r["step"]] = r["tokens_per_sec"]
    if "kl" in r and "eval_ce" not in r:
      train_kl[r["step"]] = r["kl"] / LOG2
    if "eval_ce" in r:
      rows.append({"step": r["step"], "eval_ce": r["eval_ce"], "eval_elbo": r["eval_elbo"],
                   "eval_kl_bits": r.get("eval_kl", 0) / LOG2,
                   "eval_z_use": r.get("eval_z_use"),
                   "eval_z_mi_bits": r.get("eval_z_mi", 0) / LOG2,
                   "eval_z_active_bits": r.get("eval_z_active_bits"),
                   "tokens_per_sec": speed.get(r["step"])})
  if not train_kl:
    raise SystemExit(f"main_job_curve: no train rows in {run}/metrics.jsonl")
  last = max(train_kl)
  second_half = [v for step, v in train_kl.items() if step > last / 2]
  return rows, sum(second_half) / len(second_half)


def shared_z_columns(tests):
  """`zdiag.shared_z_tests`' result as flat columns: position_within, ..., noise_p."""
  return {f"{name}_{k}": v for name, t in tests.items()
          for k, v in zip(("within", "across", "p"), t)}


def shared_z_study(run):
  """The shared-Z samples of the run's final checkpoint and their statistics."""
  from ftjax import zdiag
  from ftjax.trainer import load_run
  from ftjax.data import synthetic
  trainer, state = load_run(run)
  texts, groups = zdiag.shared_z_samples(trainer, state.params, NUM_Z, PER_Z)
  tests = zdiag.shared_z_tests(texts, groups)
  starts = [s for s in map(zdiag.block_start, texts) if s is not None]
  block_len = trainer.cfg.data.block_len
  lines = zdiag.shared_z_lines(texts, groups, tests, block_len)
  position_chance, distance_chance = zdiag.block_start_chance(block_len)
  print("\n".join(lines))
  return {"seed": int(trainer.cfg.seed), "step": int(state.step),
          "target_bits": trainer.cfg.model.latent.target_bits,
          **shared_z_columns(tests),
          "position_chance": position_chance, "distance_chance": distance_chance,
          "samples": len(texts),
          "with_block": len(starts), "start_std": float(np.std(starts)),
          "data_start_std": math.sqrt((zdiag.block_starts(block_len)**2 - 1) / 12),
          "well_formed": sum(synthetic.well_formed(texts, block_len)),
          "lines": lines}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", action="append", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--wall_s", action="append", default=[],
                      help="NAME=SECONDS: the measured wall time of the run named NAME (recorded).")
  parser.add_argument("--machine", default="", help="Where it ran (recorded).")
  args = parser.parse_args(argv)
  try:
    walls = {k: float(v) for k, v in (w.split("=", 1) for w in args.wall_s)}
  except ValueError:
    parser.error("--wall_s takes NAME=SECONDS, e.g. --wall_s=seed0=275")
  summary = []
  for run in args.run:
    name = os.path.basename(os.path.normpath(run))
    out = os.path.join(args.out, name)
    os.makedirs(out, exist_ok=True)
    curve, train_kl_2nd_half = read_curves(run)
    write_csv(os.path.join(out, "curve.csv"), curve)
    study = shared_z_study(run)
    wall = walls.get(name)
    with open(os.path.join(out, "zsamples.json"), "w", encoding="utf-8") as f:
      json.dump({"run": name, "wall_s": wall, "machine": args.machine, **study}, f, indent=1)
    summary.append({"run": name, "seed": study["seed"], "step": study["step"], "wall_s": wall,
                    "target_bits": study["target_bits"],
                    "train_kl_bits_2nd_half": train_kl_2nd_half,
                    **{k: v for k, v in curve[-1].items() if k not in ("step", "tokens_per_sec")},
                    **{k: study[k] for k in (*TEST_COLUMNS,
                                             "samples", "with_block", "start_std",
                                             "well_formed")}})
  write_csv(os.path.join(args.out, "summary.csv"), summary)
  for row in summary:
    print(row)


if __name__ == "__main__":
  main()
