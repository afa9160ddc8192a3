"""The free-text comparison's result table from the run files of experiments/free_text.py, with the decision rule
of experiments/results/free_text/PROTOCOL.md applied as written there.

  python -m experiments.free_text_results --root=runs/free_text \
      --out=experiments/results/free_text --device="..."

Reads each run's config.json, metrics.jsonl (its last eval row) and, for a FT, iw_bound.json
(experiments/free_text.py's after_point), and writes under --out:
  runs.csv     one row per run: arm, seed, steps, uniform-Z eval bpb, ELBO bpb, IW bound bpb
               (K = 1, 4, 16), KL in bits per token, eval_z_use (nats), the fraction of the spent
               KL recovered (eval_z_use / KL, both in nats per token);
  curves.csv   one row per run and eval step (experiments/text_results.py's metrics);
  arms.csv     per arm: the seeds' mean ± std, the paired differences of eval_bpb to arm (a) with
               their 95 % t-interval, how many seeds read Z, and the rule's verdict;
  decision.md  arms.csv as the markdown table, then one line per FT arm.
Runs short of their configured steps are listed in runs.csv and left out of arms.csv.
"""

import json
import math
import os

from experiments import free_text
from experiments.kappa_results import LOG2, cell, mean_std, write_csv
from experiments.text_results import parse_and_read, read_run as read_text_run

ARMS = {"a": "(a) baseline + 1 block", "b": "(b) FT, target 1/16 bit",
        "c": "(c) FT, target 1/4 bit", "d": "(d) baseline"}
READS_Z_NATS = 0.01  # a seed reads Z when its eval_z_use is at least this
READS_Z_SEEDS = 5  # an arm reads Z when at least this many of its seeds do
FREE_BPB = 0.005  # "free at this scale": the interval's upper end at most this
# 0.975 quantiles of Student's t by degrees of freedom (the rule uses 5: six paired seeds)
T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582}
RUN_METRICS = ("eval_bpb", "eval_elbo_bpb", "iw1_bpb", "iw4_bpb", "iw16_bpb", "eval_kl_bits",
               "eval_z_use", "kl_recovered")


def arm_of(cfg):
  """'a', 'b', 'c' or 'd' from a run's config.json."""
  lat = cfg["model"]["latent"]
  if not lat["enabled"]:
    return "a" if cfg["model"]["num_layers"] == 5 else "d"
  return "b" if math.isclose(lat["target_bits"], free_text.TARGET_BITS[0]) else "c"


def read_run(run_dir):
  """(the run's row of runs.csv, its eval curve)."""
  row, curve = read_text_run(run_dir)
  with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
    row["arm"] = arm_of(json.load(f))
  row["model"] = ARMS[row["arm"]]
  curve = [{**c, "model": row["model"]} for c in curve]
  if row.get("eval_kl_bits"):
    row["kl_recovered"] = row["eval_z_use"] / (row["eval_kl_bits"] * LOG2)
  iw_path = os.path.join(run_dir, free_text.IW_FILE)
  if os.path.exists(iw_path):
    with open(iw_path, encoding="utf-8") as f:
      iw = json.load(f)
    row.update({k: v for k, v in iw.items() if k.endswith("_bpb")}, iw_step=iw["step"])
  return row, curve


def t_interval(values):
  """(mean, low, high): the 95 % t-interval of the mean (None bounds with fewer than 2)."""
  mean, std, n = mean_std(values)
  if n < 2:
    return mean, None, None
  half = T975[n - 1] * std / math.sqrt(n)
  return mean, mean - half, mean + half


def verdict(arm_runs, control_runs):
  """The rule's words for a FT arm: its runs and arm (a)'s, by seed (finished runs only)."""
  pairs = [(arm_runs[s], control_runs[s]) for s in free_text.SEEDS
           if s in arm_runs and s in control_runs]
  reading = sum(r["eval_z_use"] >= READS_Z_NATS for r in arm_runs.values())
  mean, low, high = t_interval([r["eval_bpb"] - c["eval_bpb"] for r, c in pairs])
  ci = "" if low is None else f" (95 % CI [{low:+.4f}, {high:+.4f}] bpb)"
  out = {"seeds_reading_z": reading, "paired_seeds": len(pairs), "diff_mean": mean,
         "diff_low": low, "diff_high": high}
  if len(pairs) < len(free_text.SEEDS) or len(arm_runs) < len(free_text.SEEDS):
    out["verdict"] = f"incomplete: {len(pairs)} of {len(free_text.SEEDS)} paired seeds{ci}"
  elif reading < READS_Z_SEEDS:
    out["verdict"] = (f"does not read Z ({reading} of {len(arm_runs)} seeds at "
                      f"eval_z_use ≥ {READS_Z_NATS}): rule not applied{ci}")
  elif high <= FREE_BPB:
    out["verdict"] = f"free at this scale{ci}"
  elif low > 0:
    out["verdict"] = f"tax of {mean:+.4f} bpb{ci}"
  else:
    out["verdict"] = f"inconclusive{ci}"
  return out


def arms(runs):
  """Per arm, over its finished runs: mean ± std of RUN_METRICS, the paired eval_bpb differences
  to arm (a) and, for the FT arms, the rule's verdict."""
  done = {a: {r["seed"]: r for r in runs if r["arm"] == a and r["finished"]} for a in ARMS}
  out = []
  for a, label in ARMS.items():
    by_seed = done[a]
    row = {"arm": label, "seeds": ",".join(str(s) for s in sorted(by_seed))}
    for m in RUN_METRICS:
      mean, std, n = mean_std([r.get(m) for r in by_seed.values()])
      if n:
        row[f"{m}_mean"], row[f"{m}_std"] = mean, std
    if a in ("b", "c"):
      row.update(verdict(by_seed, done["a"]))
    elif a == "d":
      row["diff_mean"], row["diff_low"], row["diff_high"] = t_interval(
          [r["eval_bpb"] - done["a"][s]["eval_bpb"] for s, r in by_seed.items() if s in done["a"]])
    out.append(row)
  return out


def markdown(summary, device):
  cols = (("eval_bpb", "uniform-Z bpb", 4), ("eval_elbo_bpb", "ELBO bpb", 4),
          ("iw16_bpb", "IW bound bpb (K=16)", 4), ("eval_kl_bits", "KL (bits/token)", 3),
          ("eval_z_use", "eval_z_use (nats)", 4), ("kl_recovered", "KL recovered", 2))
  lines = [f"Runs of experiments/free_text.py ({device or 'device not given'}); mean ± std over "
           "seeds; differences paired by seed, 95 % t-interval.", "",
           "| arm | seeds | " + " | ".join(c[1] for c in cols)
           + " | seeds reading Z | bpb − (a) [95 % CI] |", "|---" * (len(cols) + 4) + "|"]
  for g in summary:
    cells = [cell(g.get(f"{k}_mean"), g.get(f"{k}_std"), digits) for k, _, digits in cols]
    diff = "–"
    if g.get("diff_low") is not None:
      diff = f"{g['diff_mean']:+.4f} [{g['diff_low']:+.4f}, {g['diff_high']:+.4f}]"
    reading = g.get("seeds_reading_z", "–")
    lines.append(f"| {g['arm']} | {g['seeds']} | " + " | ".join(cells) + f" | {reading} | {diff} |")
  lines.append("")
  lines += [f"- {g['arm']}: {g['verdict']}" for g in summary if "verdict" in g]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser, args, runs, curves = parse_and_read(argv, __doc__.split("\n")[0], read_run)
  missing = [r["run"] for r in runs if r["finished"] and r["arm"] in "bc" and "iw16_bpb" not in r]
  if missing:
    parser.error(f"finished FT runs without {free_text.IW_FILE}: {', '.join(missing)}; run "
                 f"python -m experiments.free_text --root={args.root}")
  os.makedirs(args.out, exist_ok=True)
  write_csv(os.path.join(args.out, "runs.csv"), runs)
  write_csv(os.path.join(args.out, "curves.csv"), curves)
  summary = arms(runs)
  write_csv(os.path.join(args.out, "arms.csv"), summary)
  table = markdown(summary, args.device)
  with open(os.path.join(args.out, "decision.md"), "w", encoding="utf-8") as f:
    f.write(table)
  print(table, end="")


if __name__ == "__main__":
  main()
