"""Turns a finished (or partly finished) κ study into committed result files.

  python -m experiments.kappa_results --archive=OUT/kappa_study_runs.tar.gz \
      --out=experiments/results/kappa_study --device="NVIDIA H200"
  python -m experiments.kappa_results --root=runs/kappa_study --out=... --device="2-core CPU"
  python -m experiments.kappa_results --root=... --out=... --device=... \
      --also=experiments/results/kappa_study_h200/results.json --also_only=post_sampler=onehot

Reads each run's config.json, metrics.jsonl and zstudy.json (written by
experiments/kappa_study.py's after_point) and writes under --out:
  runs.csv        one row per run: its point, seed, steps done, the last eval row (eval_ce,
                  eval_elbo, KL in bits, the Z diagnostics), the fixed-Z statistics with
                  permutation p-values over the Z-group labels, and the stricter checks of
                  synthetic_study.strict_stats on the uniform-Z samples;
  groups.csv      per (post-sampler, κ or target): mean and sample standard deviation over the
                  seeds of each metric, the number of seeds, the number of seeds whose position
                  permutation p is below 0.05 (p-values are counted, not averaged), and the paired
                  difference to the baseline of the same seed (mean ± std over seeds);
  groups.md       groups.csv as the markdown table of experiments/studies/kappa.md;
  controller.csv  the target-rate runs: mean train KL over the second half of the run against
                  the target (within 10 %?), and at 1 bit the comparison with fixed κ = 1 bit;
  results.json    all of it, plus the device and the source.
Runs that did not reach their configured steps are listed with the step they reached and left
out of groups.csv unless --partial. --also adds the runs of an earlier results.json (those whose
name matches --also_only), e.g. other seeds of the same points run on another machine; every run
row names the device that ran it.
"""

import argparse
import csv
import fractions
import json
import math
import os
import re
import tarfile
import tempfile

import numpy as np

from experiments import synthetic_study
from ftjax.metrics import read_rows

LOG2 = math.log(2)
EVAL_KEYS = ("eval_ce", "eval_elbo", "eval_kl", "eval_z_use", "eval_z_mi", "eval_z_mi_bits_bound",
             "eval_z_active_bits", "eval_z_code_ppl", "eval_z_code_ppl_argmax")
GROUP_METRICS = ("eval_ce", "eval_elbo", "eval_kl_bits", "eval_z_use", "eval_z_mi_bits",
                 "eval_z_active_bits", "eval_z_code_ppl_argmax", "position_same_minus_other",
                 "position_p", "noise_jaccard_same_minus_other", "noise_jaccard_p",
                 "uniform_in_block_bang", "uniform_strict_well_formed", "uniform_start_uniform_p",
                 "uniform_start_max", "well_formed_uniform", "train_kl_bits_2nd_half")
ALPHA = 0.05
POSITION_SEEDS = "position_p_seeds_below_0.05"  # groups(): seeds whose position p < ALPHA


def read_run(run_dir, draws):
  with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  rows = read_rows(run_dir)
  lat, steps = cfg["model"]["latent"], cfg["train"]["steps"]
  control = lat.get("kl_control", "free_bits")
  out = {"run": os.path.basename(run_dir), "seed": cfg["seed"], "enabled": lat["enabled"],
         "post_sampler": lat["post_sampler"] if lat["enabled"] else "baseline",
         "kl_control": control if lat["enabled"] else "",
         "kappa_bits": (lat["kappa"] / LOG2 if control == "free_bits" and lat["enabled"] else ""),
         "target_bits": lat.get("target_bits") if control == "target_rate" else "",
         "control_beta_init": lat.get("control_beta_init") if control == "target_rate" else "",
         "steps": steps, "step_reached": max((r["step"] for r in rows), default=0)}
  out["finished"] = out["step_reached"] >= steps
  evals = [r for r in rows if "eval_ce" in r]
  if evals:
    last = evals[-1]
    out["eval_step"] = last["step"]
    out.update({k: last[k] for k in EVAL_KEYS if k in last})
    if "eval_kl" in last:
      out["eval_kl_bits"] = last["eval_kl"] / LOG2
    if "eval_z_mi" in last:
      out["eval_z_mi_bits"] = last["eval_z_mi"] / LOG2
  train_kl = [(r["step"], r["kl"]) for r in rows if "kl" in r]
  if train_kl:
    out["train_kl_bits_first_step"] = train_kl[0][1] / LOG2  # step 1: the initial parameters
  half = [kl for s, kl in train_kl if s > steps / 2]
  if half:
    out["train_kl_bits_2nd_half"] = float(np.mean(half)) / LOG2
    out["train_kl_bits_2nd_half_rows"] = len(half)
  zpath = os.path.join(run_dir, "zstudy.json")
  if os.path.exists(zpath):
    with open(zpath, encoding="utf-8") as f:
      z = json.load(f)
    out["well_formed_uniform"] = z.get("well_formed_uniform")
    if z.get("fixed_texts"):
      out["well_formed_fixed"] = z.get("well_formed_fixed")
      perm = synthetic_study.permutation_test(z["fixed_texts"], z["fixed_groups"], draws=draws)
      for k, v in perm.items():
        out[f"{k}_same_minus_other"] = v["same_minus_other"]
        out[f"{k}_p"] = v["p_value"]
    if z.get("uniform_texts"):
      strict = synthetic_study.strict_stats(z["uniform_texts"], draws=draws)
      out.update({f"uniform_{k}": v for k, v in strict.items() if not k.startswith("data_")})
  return out


def mean_std(values):
  values = [v for v in values if isinstance(v, (int, float)) and v == v]
  if not values:
    return None, None, 0
  return (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None,
          len(values))


def group_key(r):
  if not r["enabled"]:
    return ("baseline", "", "")
  if r["kl_control"] == "target_rate":
    return (r["post_sampler"], f"target_bits (beta_init {r['control_beta_init']})",
            r["target_bits"])
  return (r["post_sampler"], "kappa_bits", round(r["kappa_bits"], 6))


def groups(runs):
  by = {}
  for r in runs:
    by.setdefault(group_key(r), []).append(r)
  base = {r["seed"]: r for r in runs if not r["enabled"]}
  out = []
  for key, rs in sorted(by.items(), key=lambda kv: [str(x) for x in kv[0]]):
    row = {"post_sampler": key[0], "knob": key[1], "value": key[2],
           "seeds": ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))}
    for m in GROUP_METRICS:
      mean, std, n = mean_std([r.get(m) for r in rs])
      if n:
        row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"] = mean, std, n
    ps = [p for p in (r.get("position_p") for r in rs) if isinstance(p, (int, float)) and p == p]
    if ps:
      row[POSITION_SEEDS] = sum(p < ALPHA for p in ps)
    if key[0] != "baseline":
      for m in ("eval_ce", "eval_elbo"):
        diffs = [r[m] - base[r["seed"]][m] for r in rs
                 if r["seed"] in base and m in r and m in base[r["seed"]]]
        mean, std, n = mean_std(diffs)
        if n:
          row[f"{m}_minus_baseline_mean"], row[f"{m}_minus_baseline_std"] = mean, std
          row[f"{m}_minus_baseline_n"] = n
    out.append(row)
  return out


def controller(runs):
  rows = []
  fixed1 = {r["seed"]: r for r in runs if r["enabled"] and r["kl_control"] == "free_bits"
            and r["post_sampler"] == "bits" and abs(r["kappa_bits"] - 1) < 1e-9}
  for r in runs:
    if r.get("kl_control") != "target_rate" or "train_kl_bits_2nd_half" not in r:
      continue
    kl, target = r["train_kl_bits_2nd_half"], r["target_bits"]
    row = {"run": r["run"], "seed": r["seed"], "target_bits": target,
           "control_beta_init": r["control_beta_init"],
           "step_reached": r["step_reached"], "steps": r["steps"],
           "train_kl_bits_2nd_half": kl, "rows_averaged": r["train_kl_bits_2nd_half_rows"],
           "relative_error": kl / target - 1, "within_10pct": abs(kl / target - 1) <= 0.10}
    if abs(target - 1) < 1e-9 and r["seed"] in fixed1:
      for m in ("eval_elbo", "eval_ce"):
        if m in r and m in fixed1[r["seed"]]:
          row[f"{m}_minus_fixed_kappa1"] = r[m] - fixed1[r["seed"]][m]
    rows.append(row)
  return rows


def fixed_kappa1_spread(runs):
  """Seed spread (sample std) of fixed κ = 1 bit (per-bit), the yardstick of the 1-bit check."""
  rs = [r for r in runs if r["enabled"] and r["kl_control"] == "free_bits"
        and r["post_sampler"] == "bits" and abs(r["kappa_bits"] - 1) < 1e-9]
  return {m: mean_std([r.get(m) for r in rs]) for m in ("eval_elbo", "eval_ce")}


def earlier_runs(path, only):
  """The runs of an earlier results.json whose name matches the regex `only`, with its device."""
  with open(path, encoding="utf-8") as f:
    earlier = json.load(f)
  return [{**r, "device": r.get("device", earlier["device"])} for r in earlier["runs"]
          if re.search(only, r["run"])]


def read_also(parser, args, read, what):
  """read(args.also, args.also_only), or None without --also. A bad regex, a missing file or a
  file that `read` cannot take (not `what`) end the program in one line (exit 2)."""
  try:
    re.compile(args.also_only)
  except re.error as e:
    parser.error(f"--also_only: not a regular expression ({e}): {args.also_only}")
  if not args.also:
    return None
  if not os.path.isfile(args.also):
    parser.error(f"--also: no file {args.also}")
  try:
    return read(args.also, args.also_only)
  except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
    parser.error(f"--also: {args.also} is not {what} ({e!r})")


def cell(mean, std, digits, sign=""):
  """A table cell: mean ± std ('–' when there is no value; no ± with one seed)."""
  if mean is None or mean == "":
    return "–"
  text = f"{mean:{sign}.{digits}f}"
  return text if std is None else f"{text} ± {std:.{digits}f}"


def point_label(g):
  """A groups() row's point as README text: 'baseline', 'per-bit κ 1/4', 'one-hot κ 4', ..."""
  if g["post_sampler"] == "baseline":
    return "baseline"
  sampler = {"bits": "per-bit", "onehot": "one-hot"}.get(g["post_sampler"], g["post_sampler"])
  value = str(fractions.Fraction(g["value"]).limit_denominator(64))
  return f"{sampler} κ {value}" if g["knob"] == "kappa_bits" else f"{sampler} target {value} bit"


# (groups() metric, column, digits, sign); the position p-values are shown as the number of seeds
# below ALPHA out of the seeds tested (a mean of p-values is not a p-value).
MARKDOWN_COLUMNS = (("eval_ce", "eval CE", 3, ""),
                    ("eval_ce_minus_baseline", "CE − baseline", 3, "+"),
                    ("eval_elbo", "ELBO", 3, ""),
                    ("eval_kl_bits", "KL bits", 2, ""),
                    ("eval_z_use", "Z use", 3, ""),
                    ("position_same_minus_other", "position", 3, "+"),
                    ("position_p", "seeds p < 0.05", 0, ""),
                    ("uniform_in_block_bang", "in-block !", 3, ""),
                    ("uniform_strict_well_formed", "strict", 2, ""))


def markdown_table(grouped):
  """groups() as the markdown table of experiments/studies/kappa.md (mean ± std over seeds;
  CE − baseline: the paired difference to the same seed's baseline; position p: seeds below
  ALPHA of the seeds tested)."""
  lines = ["| run | seeds | " + " | ".join(c[1] for c in MARKDOWN_COLUMNS) + " |",
           "|---" * (2 + len(MARKDOWN_COLUMNS)) + "|"]

  def count(g):
    return f"{g[POSITION_SEEDS]} of {g['position_p_n']}" if POSITION_SEEDS in g else "–"
  for g in grouped:
    cells = [count(g) if key == "position_p" else
             cell(g.get(f"{key}_mean"), g.get(f"{key}_std"), digits, sign)
             for key, _, digits, sign in MARKDOWN_COLUMNS]
    lines.append(f"| {point_label(g)} | {g['seeds']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_csv(path, rows):
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, keys)
    writer.writeheader()
    writer.writerows(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--archive", help="kappa_study_runs.tar.gz from run_kappa_study_gpu.py")
  src.add_argument("--root", help="A directory of runs.")
  parser.add_argument("--out", required=True)
  parser.add_argument("--device", required=True, help="Which machine ran it (recorded).")
  parser.add_argument("--partial", action="store_true", help="Group unfinished runs too.")
  parser.add_argument("--draws", type=int, default=10000, help="Permutations per test.")
  parser.add_argument("--also", help="results.json of earlier runs to group with these.")
  parser.add_argument("--also_only", default="", help="Regex: --also runs whose name matches.")
  args = parser.parse_args(argv)
  earlier = read_also(parser, args, earlier_runs, "a kappa_results results.json")
  with tempfile.TemporaryDirectory() as tmp:
    root = args.root
    if args.archive:
      with tarfile.open(args.archive) as tar:
        tar.extractall(tmp, filter="data")
      root = os.path.join(tmp, "kappa_study")
    runs = [read_run(os.path.join(root, d), args.draws) for d in sorted(os.listdir(root))
            if os.path.exists(os.path.join(root, d, "metrics.jsonl"))
            and os.path.exists(os.path.join(root, d, "config.json"))]
  for r in runs:
    r["device"] = args.device
  if args.also:
    runs += earlier
    runs.sort(key=lambda r: (r["seed"], r["run"]))
  if not runs:
    raise SystemExit("kappa_results: no runs found")
  os.makedirs(args.out, exist_ok=True)
  grouped = groups([r for r in runs if r["finished"] or args.partial])
  ctl = controller(runs)
  write_csv(os.path.join(args.out, "runs.csv"), runs)
  write_csv(os.path.join(args.out, "groups.csv"), grouped)
  with open(os.path.join(args.out, "groups.md"), "w", encoding="utf-8") as f:
    f.write(markdown_table(grouped))
  if ctl:
    write_csv(os.path.join(args.out, "controller.csv"), ctl)
  with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"device": args.device, "source": os.path.basename(args.archive or args.root),
               "also": args.also and {"path": args.also, "only": args.also_only},
               "runs": runs, "groups": grouped, "controller": ctl,
               "fixed_kappa1_spread": fixed_kappa1_spread(runs)}, f, indent=1)
  done = sum(r["finished"] for r in runs)
  print(f"{len(runs)} runs ({done} finished) from {args.archive or args.root}; wrote "
        f"runs.csv, groups.csv, groups.md{', controller.csv' if ctl else ''}, results.json in {args.out}")
  for g in grouped:
    ce = g.get("eval_ce_mean")
    print(f"  {g['post_sampler']:8s} {g['knob']:11s} {g['value']!s:8s} seeds {g['seeds']:6s} "
          f"eval_ce {ce if ce is None else round(ce, 4)} KL bits "
          f"{g.get('eval_kl_bits_mean')} seeds with position p < {ALPHA}: "
          f"{g.get(POSITION_SEEDS, '-')} of {g.get('position_p_n', 0)}")


if __name__ == "__main__":
  main()
