"""Plots from runs' metrics.jsonl files: curves against the step, or final values across a sweep.

  python -m experiments.plot curves --runs runs/a runs/b [--labels A B] \
      --metrics=eval_ce,eval_elbo --out=curves.png
  python -m experiments.plot sweep --root=runs/synthetic_sweep --x=kappa_bits \
      --metrics=eval_kl_bits,eval_ce --out=sweep.png

`curves`: one panel per metric, one line per run. `sweep`: every sub-directory of --root with a
config.json is a point; its last value of each metric is plotted against the config key --x
(a leaf name such as kappa_bits, or a dotted path), one line per value of --group (config keys,
comma-separated; default num_bits); runs with the latent off are drawn as horizontal lines. A
metric named <m>_bits is <m> (nats) divided by ln 2. The same scalars are in each run's
TensorBoard directory (tb/).
"""

import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ftjax.metrics import read_rows  # noqa: E402


def read_metrics(workdir):
  """{metric: [(step, value), ...]} from workdir/metrics.jsonl (a torn last line is skipped)."""
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    sys.exit(f"plot: no metrics.jsonl in {workdir}")
  series = {}
  for row in read_rows(workdir):
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        series.setdefault(k, []).append((row["step"], v))
        if k.endswith(("kl", "ce", "elbo")):
          series.setdefault(k + "_bits", []).append((row["step"], v / math.log(2)))
  return series


def config_value(workdir, key):
  """The value of `key` (dotted path, or a leaf name found anywhere) in workdir/config.json."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    cfg = json.load(f)

  def find(node, parts):
    if not parts:
      return node
    if isinstance(node, dict):
      if parts[0] in node:
        return find(node[parts[0]], parts[1:])
      if len(parts) == 1:
        for child in node.values():
          found = find(child, parts)
          if found is not None:
            return found
    return None

  value = find(cfg, key.split("."))
  if value is None and key.split(".")[-1] == "kappa_bits":  # saved configs hold κ in nats
    kappa = find(cfg, ["kappa"])
    value = None if kappa is None else kappa / math.log(2)
  return value


def last(series, metric, workdir):
  if metric not in series:
    sys.exit(f"plot: {workdir} has no metric {metric!r} (has: {', '.join(sorted(series))})")
  return series[metric][-1][1]


def plot_curves(runs, labels, metrics, out, title=""):
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
  data = [read_metrics(r) for r in runs]
  for ax, metric in zip(axes[0], metrics):
    for series, label, run in zip(data, labels, runs):
      if metric in series:
        steps, values = zip(*series[metric])
        ax.plot(steps, values, marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_title(metric)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  print(f"wrote {out}")


def sweep_points(root, x, group):
  """[(workdir, x value or None for a baseline, group label)] of the runs under `root`; `group`
  is a comma-separated list of config keys."""
  points = []
  for name in sorted(os.listdir(root)):
    workdir = os.path.join(root, name)
    if not os.path.exists(os.path.join(workdir, "config.json")):
      continue
    if not config_value(workdir, "model.latent.enabled"):
      points.append((workdir, None, None))
      continue
    label = ",".join(f"{g}={config_value(workdir, g)}" for g in group.split(","))
    points.append((workdir, config_value(workdir, x), label))
  if not points:
    sys.exit(f"plot: no run (sub-directory with config.json) under {root}")
  return points


def plot_sweep(root, x, group, metrics, out, title=""):
  points = sweep_points(root, x, group)
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    lines = {}
    for workdir, xv, gv in points:
      series = read_metrics(workdir)
      if gv is None:
        if metric in series:
          ax.axhline(last(series, metric, workdir), color="k", ls="--",
                     label=f"baseline {os.path.basename(workdir)}")
        continue
      lines.setdefault(gv, []).append((xv, last(series, metric, workdir)))
    for gv, xy in sorted(lines.items()):
      xs, ys = zip(*sorted(xy))
      ax.plot(xs, ys, marker="o", label=gv)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  print(f"wrote {out}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="mode", required=True)
  c = sub.add_parser("curves")
  c.add_argument("--runs", nargs="+", required=True)  # run names may hold commas
  c.add_argument("--labels", nargs="+")
  s = sub.add_parser("sweep")
  s.add_argument("--root", required=True)
  s.add_argument("--x", default="kappa_bits")
  s.add_argument("--group", default="num_bits")
  for p in (c, s):
    p.add_argument("--metrics", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
  args = parser.parse_args(argv)
  metrics = args.metrics.split(",")
  if args.mode == "curves":
    runs = args.runs
    labels = args.labels or [os.path.basename(r) for r in runs]
    if len(labels) != len(runs):
      sys.exit("plot: --labels must name every run")
    plot_curves(runs, labels, metrics, args.out, args.title)
  else:
    plot_sweep(args.root, args.x, args.group, metrics, args.out, args.title)


if __name__ == "__main__":
  main()
