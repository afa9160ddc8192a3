"""When does a Free Transformer's decoder start to read Z? Onset steps from the eval rows.

  python -m experiments.z_onset --root=runs/kappa_study [--root=...] --out=DIR [--threshold=0.01]
  python -m experiments.z_onset --root=... --out=DIR --also=DIR/z_use_curves.csv --also_only=REGEX

For every FT run under the roots (directories with config.json and metrics.jsonl), the decoder's
use of Z (eval_z_use: uniform-Z CE minus encoder-Z CE, nats per token) at each eval row. Writes
under --out:
  z_use_curves.csv    one row per run and eval step: Z use, the KL in bits per token and, for
                      the target-rate control, β at that step;
  z_onset.csv         per run: the first eval step at which Z use reaches --threshold (empty if
                      it never does), the largest |Z use| before it, and the last Z use;
  z_onset_groups.csv  per point (the run's name without its "seed=S," prefix): the seeds, how
                      many of them started to read Z, their onset steps, the mean ± sample std
                      of the last Z use.
The onset step is only as fine as the eval interval: "1250" means between the eval before and
step 1250. The default threshold, 0.01 nats, is several times the largest |Z use| of runs that
never read Z (z_onset.csv's `max_abs_z_use_before` shows it).
--also adds the curves of an earlier z_use_curves.csv (the runs whose name matches --also_only),
e.g. runs whose directories are gone; a run found under a root replaces its earlier curve.
"""

import argparse
import csv
import glob
import json
import os
import re

from experiments.kappa_results import LOG2, mean_std, read_also, write_csv
from experiments.readme_tables import latent_columns
from ftjax.metrics import read_rows


CURVE_COLUMNS = ("run", "seed", "step", "eval_z_use", "eval_kl_bits", "kl_beta")  # z_use_curves.csv


def point_name(run):
  return re.sub(r"^seed=\d+,", "", run)


def z_use(row):
  """eval_z_use, or for runs of versions that did not log it, eval_ce − (eval_elbo − eval_kl):
  the same difference, uniform-Z CE minus encoder-Z CE, from the ELBO's two terms."""
  if "eval_z_use" in row:
    return row["eval_z_use"]
  return latent_columns(row)["z_use"]


def read_curve(run_dir):
  """[(step, z_use, kl_bits, kl_beta)] of a run's FT eval rows (empty for a baseline); kl_beta is
  the target-rate multiplier logged at that step (None without one)."""
  rows = read_rows(run_dir)
  beta = {r["step"]: r["kl_beta"] for r in rows if "kl_beta" in r}
  return [(r["step"], z_use(r), r["eval_kl"] / LOG2, beta.get(r["step"]))
          for r in rows if "eval_kl" in r]


def earlier_curves(path, only):
  """{run: (seed, curve)} from an earlier z_use_curves.csv, the runs whose name matches `only`."""
  runs = {}
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    missing = sorted(set(CURVE_COLUMNS) - set(reader.fieldnames or ()))
    if missing:
      raise ValueError(f"no column {', '.join(missing)}")
    for row in reader:
      if re.search(only, row["run"]):
        beta = float(row["kl_beta"]) if row["kl_beta"] else None
        runs.setdefault(row["run"], (int(row["seed"]), []))[1].append(
            (int(row["step"]), float(row["eval_z_use"]), float(row["eval_kl_bits"]), beta))
  return runs


def onset(curve, threshold):
  """(first step with Z use ≥ threshold or None, max |Z use| of the eval rows before it)."""
  before = []
  for step, z_use, *_ in curve:
    if z_use >= threshold:
      return step, max(before, default=0.0)
    before.append(abs(z_use))
  return None, max(before, default=0.0)


def summarize(runs, threshold):
  """(per-run rows, per-point rows) from {run name: (seed, curve)}."""
  per_run = []
  for name, (seed, curve) in sorted(runs.items()):
    start, noise = onset(curve, threshold)
    per_run.append({"run": name, "point": point_name(name), "seed": seed,
                    "last_step": curve[-1][0], "onset_step": start,
                    "max_abs_z_use_before": noise, "last_z_use": curve[-1][1],
                    "last_kl_bits": curve[-1][2]})
  per_point = []
  for point in dict.fromkeys(r["point"] for r in per_run):
    rs = sorted((r for r in per_run if r["point"] == point), key=lambda r: r["seed"])
    mean, std, _ = mean_std([r["last_z_use"] for r in rs])
    per_point.append({"point": point, "seeds": ",".join(str(r["seed"]) for r in rs),
                      "last_steps": ",".join(str(r["last_step"]) for r in rs),
                      "started": sum(r["onset_step"] is not None for r in rs),
                      "onset_steps": ",".join("-" if r["onset_step"] is None
                                              else str(r["onset_step"]) for r in rs),
                      "last_z_use_mean": mean, "last_z_use_std": std})
  return per_run, per_point


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", action="append", required=True, help="A sweep's --workdir.")
  parser.add_argument("--out", required=True)
  parser.add_argument("--threshold", type=float, default=0.01, help="Z use (nats per token).")
  parser.add_argument("--also", help="z_use_curves.csv of earlier runs to add to these.")
  parser.add_argument("--also_only", default="", help="Regex: --also runs whose name matches.")
  args = parser.parse_args(argv)
  runs = read_also(parser, args, earlier_curves, "a z_use_curves.csv") or {}
  for root in args.root:
    for d in sorted(glob.glob(os.path.join(root, "*"))):
      if not os.path.exists(os.path.join(d, "metrics.jsonl")):
        continue
      curve = read_curve(d)
      if curve:
        with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
          runs[os.path.basename(d)] = (json.load(f)["seed"], curve)
  if not runs:
    parser.error(f"no Free Transformer run (eval rows with eval_kl) under {args.root}")
  per_run, per_point = summarize(runs, args.threshold)
  os.makedirs(args.out, exist_ok=True)
  write_csv(os.path.join(args.out, "z_use_curves.csv"),
            [dict(zip(CURVE_COLUMNS, (name, seed, *point))) for name, (seed, curve)
             in sorted(runs.items()) for point in curve])
  write_csv(os.path.join(args.out, "z_onset.csv"), per_run)
  write_csv(os.path.join(args.out, "z_onset_groups.csv"), per_point)
  for p in per_point:
    print(f"{p['point']:60s} started {p['started']}/{len(p['seeds'].split(','))} at "
          f"{p['onset_steps']:16s} last Z use {p['last_z_use_mean']:.3f}")


if __name__ == "__main__":
  main()
