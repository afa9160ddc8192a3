"""The tables of experiments/studies/synthetic_400.md and synthetic_long.md, computed from the
committed result files.

  python -m experiments.readme_tables --out=experiments/results/readme

Reads results/synthetic/summary.md and stats.json (the 400-step sweep), results/synthetic_long/
stats.json (two 3000-step runs, samples only), results/recheck/recheck.csv (permutation p-values
and strict checks of the committed renders), and writes synthetic_400.csv and synthetic_long.csv
under --out. Derived columns: KL in bits (eval_kl / ln 2), CE with encoder Z (eval_elbo − eval_kl),
decoder use of Z (eval_ce − CE with encoder Z; a diagnostic). The text tables come from
experiments/text_results.py.
"""

import argparse
import csv
import json
import math
import os

from experiments.kappa_results import write_csv

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LOG2 = math.log(2)


def read_md_table(path):
  with open(path, encoding="utf-8") as f:
    lines = [l.strip() for l in f if l.strip().startswith("|")]
  head = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = []
  for line in lines[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    row = {}
    for k, v in zip(head, cells):
      try:
        row[k] = float(v) if v else None
      except ValueError:
        row[k] = v
    rows.append(row)
  return rows


def read_recheck():
  with open(os.path.join(RESULTS, "recheck", "recheck.csv"), encoding="utf-8") as f:
    return {os.path.splitext(os.path.basename(r["source"]))[0] + "@" +
            os.path.basename(os.path.dirname(r["source"])): r for r in csv.DictReader(f)}


def latent_columns(row):
  if row.get("eval_kl") is None:
    return {}
  enc = row["eval_elbo"] - row["eval_kl"]
  return {"kl_bits": row["eval_kl"] / LOG2, "ce_encoder_z": enc, "z_use": row["eval_ce"] - enc}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  recheck = read_recheck()

  def sample_columns(run, folder):
    r = recheck.get(f"{run}@{folder}")
    if not r:
      return {}
    keep = ("position_same_minus_other", "position_p", "noise_jaccard_same_minus_other",
            "noise_jaccard_p", "in_block_bang", "strict_well_formed", "start_min", "start_max",
            "start_uniform_p")
    return {f"fixed_z_{k}": float(r[k]) for k in keep}

  stats = {s["run"]: s for s in json.load(open(os.path.join(RESULTS, "synthetic", "stats.json")))}
  rows = []
  for row in read_md_table(os.path.join(RESULTS, "synthetic", "summary.md")):
    run = row["point"]
    s = stats.get(run, {})
    out = {"run": run, "step": row["step"], "eval_ce": row["eval_ce"],
           "eval_elbo": row["eval_elbo"], **latent_columns(row),
           "well_formed_uniform": s.get("well_formed_uniform")}
    if "agreement_same_vs_different_z" in s:
      same, other = s["agreement_same_vs_different_z"]["position"]
      out.update(position_same_z=same, position_other_z=other)
    out.update(sample_columns(run, "synthetic"))
    rows.append(out)
  write_csv(os.path.join(args.out, "synthetic_400.csv"), rows)

  rows = []
  for s in json.load(open(os.path.join(RESULTS, "synthetic_long", "stats.json"))):
    same, other = s["agreement_same_vs_different_z"]["position"]
    nsame, nother = s["agreement_same_vs_different_z"]["noise_jaccard"]
    rows.append({"run": s["run"], "position_same_z": same, "position_other_z": other,
                 "noise_same_z": nsame, "noise_other_z": nother,
                 "well_formed_uniform": s["well_formed_uniform"],
                 "well_formed_fixed": s["well_formed_fixed"],
                 **sample_columns(s["run"], "synthetic_long")})
  write_csv(os.path.join(args.out, "synthetic_long.csv"), rows)

  print(f"wrote synthetic_400.csv and synthetic_long.csv in {args.out}")


if __name__ == "__main__":
  main()
