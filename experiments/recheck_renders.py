"""Stricter statistics of committed fixed-Z renders (<run>.txt written by synthetic_study):
permutation p-values over the Z-group labels and the checks of `synthetic_study.strict_stats`.

  python -m experiments.recheck_renders --renders=experiments/results/synthetic_long \
      [--renders=...] --out=experiments/results/recheck

Writes recheck.json and recheck.csv under --out (one row per render file).
"""

import argparse
import csv
import glob
import json
import os

from experiments import synthetic_study


def recheck(path, draws):
  texts, groups = synthetic_study.read_render(path)
  perm = synthetic_study.permutation_test(texts, groups, draws=draws)
  row = {"source": os.path.relpath(path), "samples": len(texts),
         "z_groups": len(set(groups))}
  for k, v in perm.items():
    row[f"{k}_same_minus_other"] = v["same_minus_other"]
    row[f"{k}_p"] = v["p_value"]
  row.update(synthetic_study.strict_stats(texts, draws=draws))
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--renders", action="append", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--draws", type=int, default=10000)
  args = parser.parse_args(argv)
  rows = [recheck(p, args.draws) for d in args.renders for p in sorted(glob.glob(
      os.path.join(d, "*.txt")))]
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "recheck.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(args.out, "recheck.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, keys)
    writer.writeheader()
    writer.writerows(rows)
  for r in rows:
    print(f"{r['source']}: position same−other {r['position_same_minus_other']:+.3f} "
          f"(p={r['position_p']:.4f}), in-block '!' {r['in_block_bang']:.3f}, starts "
          f"{r['start_min']}..{r['start_max']} (uniform p={r['start_uniform_p']:.4f})")


if __name__ == "__main__":
  main()
