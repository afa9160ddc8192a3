"""Baseline vs Free Transformer on text, over seeds: the runs of experiments/text_sweep.py as CSVs.

  python -m experiments.text_results --root=runs/text --out=experiments/results/text \
      [--device="2-core CPU"]

Writes under --out:
  runs.csv    one row per run: corpus, model, seed, steps reached and its last eval row (eval_ce in
              nats per token, eval_bpb and the ELBO in bits per byte, KL in bits per token, the
              decoder's use of Z);
  groups.csv  per (corpus, model), over the finished runs: mean and sample standard deviation
              over the seeds, and the paired differences of eval_bpb and the ELBO (bpb) to the
              4-block baseline and to the 5-block control of the same corpus and seed (mean, std,
              number of seeds). A difference whose mean is inside about one std of zero is noise
              at this number of seeds;
  groups.md   groups.csv as the markdown table of experiments/studies/text.md;
  curves.csv  one row per run and eval step (the same metrics), e.g. eval_bpb over training
              (experiments/z_onset.py reads the onset of Z use from the runs).
Runs short of their configured steps are listed in runs.csv and left out of groups.csv.
"""

import argparse
import glob
import json
import os

from experiments.kappa_results import LOG2, cell, mean_std, write_csv
from ftjax.metrics import read_rows
METRICS = ("eval_ce", "eval_bpb", "eval_elbo_bpb", "eval_kl_bits", "eval_z_use")
BASELINES = {"baseline": "baseline, 4 blocks", "control": "baseline + 1 block"}


def model_label(cfg):
  """'baseline, 4 blocks', 'baseline + 1 block' or 'FT, kappa=K bits, onehot|bits'."""
  lat = cfg["model"]["latent"]
  if not lat["enabled"]:
    extra = cfg["model"]["num_layers"] - 4
    return BASELINES["baseline"] if extra == 0 else f"baseline + {extra} block"
  return f"FT, kappa={lat['kappa'] / LOG2:g} bits, {lat['post_sampler']}"


def eval_metrics(row):
  """METRICS of one eval row (KL converted to bits per token)."""
  out = {"eval_step": row["step"], "eval_ce": row["eval_ce"], "eval_bpb": row.get("eval_bpb"),
         "eval_elbo_bpb": row.get("eval_elbo_bpb")}
  if "eval_kl" in row:
    out.update(eval_kl_bits=row["eval_kl"] / LOG2, eval_z_use=row.get("eval_z_use"))
  return out


def read_run(run_dir):
  """(the run's row of runs.csv, ending with its last eval row; all its eval rows)."""
  with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  rows = read_rows(run_dir)
  evals = [eval_metrics(r) for r in rows if "eval_ce" in r]
  out = {"run": os.path.basename(run_dir), "corpus": cfg["data"]["name"],
         "model": model_label(cfg), "seed": cfg["seed"], "steps": cfg["train"]["steps"],
         "step_reached": max((r["step"] for r in rows), default=0)}
  out["finished"] = out["step_reached"] >= out["steps"]
  curve = [{"run": out["run"], "corpus": out["corpus"], "model": out["model"],
            "seed": out["seed"], **e} for e in evals]
  return {**out, **(evals[-1] if evals else {})}, curve


def groups(runs):
  """Per (corpus, model): the seeds' mean ± std of METRICS and the paired differences."""
  done = [r for r in runs if r["finished"]]
  by_seed = {(r["corpus"], r["model"], r["seed"]): r for r in done}
  out = []
  for corpus, model in dict.fromkeys((r["corpus"], r["model"]) for r in done):
    rs = sorted((r for r in done if (r["corpus"], r["model"]) == (corpus, model)),
                key=lambda r: r["seed"])
    row = {"corpus": corpus, "model": model, "seeds": ",".join(str(r["seed"]) for r in rs)}
    for m in METRICS:
      mean, std, n = mean_std([r.get(m) for r in rs])
      if n:
        row[f"{m}_mean"], row[f"{m}_std"] = mean, std
    for ref_name, ref_model in BASELINES.items():
      if model == ref_model:
        continue
      for m in ("eval_bpb", "eval_elbo_bpb"):
        refs = [by_seed.get((corpus, ref_model, r["seed"])) for r in rs]
        mean, std, n = mean_std([r[m] - ref[m] for r, ref in zip(rs, refs) if ref])
        if n:
          row.update({f"{m}_minus_{ref_name}_mean": mean, f"{m}_minus_{ref_name}_std": std,
                      f"{m}_minus_{ref_name}_n": n})
    out.append(row)
  return out


def markdown_table(summary):
  """groups() as the markdown table of experiments/studies/text.md."""
  cols = (("eval_ce", "eval_ce (nats/byte)", 4, ""), ("eval_bpb", "eval_bpb", 4, ""),
          ("eval_elbo_bpb", "ELBO (bpb)", 4, ""), ("eval_kl_bits", "KL (bits/token)", 2, ""),
          ("eval_z_use", "decoder use of Z", 4, ""),
          ("eval_bpb_minus_baseline", "eval_bpb − baseline", 4, "+"),
          ("eval_bpb_minus_control", "eval_bpb − (baseline + 1 block)", 4, "+"))
  lines = ["| corpus | model | seeds | " + " | ".join(c[1] for c in cols) + " |",
           "|---" * (3 + len(cols)) + "|"]
  order = list(BASELINES.values())
  rank = lambda g: order.index(g["model"]) if g["model"] in order else len(order)
  for g in sorted(summary, key=lambda g: (g["corpus"], rank(g), g["model"])):
    cells = [cell(g.get(f"{key}_mean"), g.get(f"{key}_std"), digits, sign)
             for key, _, digits, sign in cols]
    lines.append(f"| {g['corpus']} | {g['model']} | {g['seeds']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def parse_and_read(argv, description, read):
  """(parser, args, runs, curves): the --root/--out/--device flags, and `read(dir)` → (run row,
  curve rows) of every run under --root (each row with the --device)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--root", required=True, help="The sweep's --workdir.")
  parser.add_argument("--out", required=True)
  parser.add_argument("--device", default="", help="Where the runs ran (recorded per run).")
  args = parser.parse_args(argv)
  dirs = sorted(d for d in glob.glob(os.path.join(args.root, "*"))
                if os.path.exists(os.path.join(d, "metrics.jsonl")))
  if not dirs:
    parser.error(f"no runs (directories with metrics.jsonl) under {args.root}")
  runs, curves = [], []
  for d in dirs:
    run, curve = read(d)
    runs.append({**run, "device": args.device})
    curves += curve
  return parser, args, runs, curves


def main(argv=None):
  _, args, runs, curves = parse_and_read(argv, __doc__.split("\n")[0], read_run)
  os.makedirs(args.out, exist_ok=True)
  write_csv(os.path.join(args.out, "runs.csv"), runs)
  write_csv(os.path.join(args.out, "curves.csv"), curves)
  summary = groups(runs)
  write_csv(os.path.join(args.out, "groups.csv"), summary)
  with open(os.path.join(args.out, "groups.md"), "w", encoding="utf-8") as f:
    f.write(markdown_table(summary))
  for g in summary:
    diff = g.get("eval_bpb_minus_baseline_mean")
    print(f"{g['corpus']:14s} {g['model']:28s} seeds {g['seeds']:6s} eval_bpb "
          f"{g['eval_bpb_mean']:.4f} ± {g['eval_bpb_std'] or 0:.4f}"
          + (f"; − baseline {diff:+.4f} ± {g['eval_bpb_minus_baseline_std'] or 0:.4f}"
             if diff is not None else ""))


if __name__ == "__main__":
  main()
