"""What the README's main job measured: its eval curve and the shared-Z sample test.

  python -m experiments.main_job_curve --run=runs/synthetic_z --out=experiments/results/main_job \
      [--wall_s=SECONDS] [--machine="2-core CPU, shared"]

Writes curve.csv (the eval rows: eval_ce, eval_elbo, KL in bits, the decoder's use of Z, the
I(X; Z) estimate, active bits; plus the train rows' tokens/s) and zsamples.json (the samples of
ftjax.zdiag.show_shared_z_samples from the run's final checkpoint: groups, the share of pairs with
the same block position within and across groups, the permutation p-value) under --out.
"""

import argparse
import csv
import json
import math
import os

LOG2 = math.log(2)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--wall_s", type=float, default=None, help="Measured wall time (recorded).")
  parser.add_argument("--machine", default="", help="Where it ran (recorded).")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  rows, speed = [], {}
  with open(os.path.join(args.run, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      if "tokens_per_sec" in r:
        speed[r["step"]] = r["tokens_per_sec"]
      if "eval_ce" in r:
        rows.append({"step": r["step"], "eval_ce": r["eval_ce"], "eval_elbo": r["eval_elbo"],
                     "eval_kl_bits": r.get("eval_kl", 0) / LOG2,
                     "eval_z_use": r.get("eval_z_use"),
                     "eval_z_mi_bits": r.get("eval_z_mi", 0) / LOG2,
                     "eval_z_active_bits": r.get("eval_z_active_bits"),
                     "tokens_per_sec": speed.get(r["step"])})
  with open(os.path.join(args.out, "curve.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)

  from ftjax import checkpoint, zdiag
  trainer, state = checkpoint.load_run(args.run)
  lines = zdiag.show_shared_z_samples(trainer, state.params, print)
  texts = [l.strip() for l in lines if l.startswith("  ")]
  groups = [i // (len(texts) // 4) for i in range(len(texts))]
  within, across, p = zdiag.shared_z_position_test(texts, groups)
  with open(os.path.join(args.out, "zsamples.json"), "w", encoding="utf-8") as f:
    json.dump({"run": os.path.basename(os.path.normpath(args.run)), "step": int(state.step),
               "wall_s": args.wall_s, "machine": args.machine,
               "same_position_within": within, "same_position_across": across,
               "permutation_p": p, "chance": 1 / 57, "lines": lines}, f, indent=1)


if __name__ == "__main__":
  main()
