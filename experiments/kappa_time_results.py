"""The training-time study's tables from the run files of experiments/kappa_time.py, with the
stages and the reading rules of experiments/results/kappa_time/PROTOCOL.md applied as written there.

  python -m experiments.kappa_time_results --root=experiments/results/kappa_time/runs \
      --out=experiments/results/kappa_time --device="..." \
      --check=experiments/results/kappa_study_cpu3000/results.json

Reads each run's config.json, metrics.jsonl (its eval rows at the studied steps), zstudy_<step>.json
and shared_z_<step>.json, and writes under --out:
  steps.csv    one row per run and studied step: eval_z_use, eval CE and KL, the shared-Z tests
               (within, across, p of position, distance and '!' overlap), the strict checks of the
               uniform-Z samples, the stage and the p-values near 0.05 it depends on;
  runs.csv     one row per run: its stage at each studied step and whether it moves along;
  changes.csv  per κ and continuous measure: the change from the first to the last studied step,
               paired by run, with its 95 % t-interval over the seeds and whether it is inside
               the noise (the interval contains 0);
  check.csv    with --check: this study's final eval rows beside the same points of an earlier
               kappa_results results.json (the protocol's repeat check);
  summary.md   the tables and one verdict line per κ.

Decided with the protocol's rules, before any run of it had finished:
- a run that reads Z but passes neither position test ("reads Z, no shared position") has no
  stage, so it cannot be ordered: such a run does not count as moving along;
- a stage "depends on a p-value near 0.05" when a p-value that decides it (the smaller of the
  position and distance p, and the '!' overlap p once position holds) lies in [0.025, 0.1).
"""

import argparse
import json
import os

from experiments import kappa_results, kappa_time, synthetic_study
from experiments.free_text_results import t_interval
from experiments.kappa_results import LOG2, write_csv
from ftjax.metrics import read_rows

ALPHA = 0.05
NEAR = (0.025, 0.1)  # a deciding p-value in this range is "near 0.05"
READS_Z_NATS = 0.01
BROKEN_STRICT = 0.5  # broken: the strict well-formed share of uniform-Z samples below this
STAGES = ("nothing", "position", "noise", "broken")
NO_POSITION = "reads Z, no shared position"
MOVES_SEEDS = 2  # a κ moves along when at least this many of its seeds do
MEASURES = ("eval_z_use", "position_within_minus_across", "uniform_in_block_bang",
            "uniform_strict_well_formed")
FINAL = ("eval_ce", "eval_elbo", "eval_kl_bits", "eval_z_use")  # the repeat check's metrics
# runs.csv's columns from kappa_results.read_run: the run, its last eval row, its step-1 KL
RUN_KEYS = ("run", "seed", "kappa_bits", "steps", "step_reached", "eval_step", *FINAL,
            "train_kl_bits_first_step")


def stage(row):
  """(stage, the deciding p-values near 0.05) of a steps.csv row."""
  if row["uniform_strict_well_formed"] < BROKEN_STRICT:
    return "broken", []
  if row["eval_z_use"] < READS_Z_NATS:
    return "nothing", []
  position_p = min(row["position_p"], row["distance_p"])
  deciding = {"position/distance": position_p}
  if position_p >= ALPHA:
    name = NO_POSITION
  else:
    deciding["'!' overlap"] = row["noise_p"]
    name = "noise" if row["noise_p"] < ALPHA else "position"
  return name, [f"{k} p = {p:.4f}" for k, p in deciding.items() if NEAR[0] <= p < NEAR[1]]


def read_json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_run(run_dir, draws):
  """(the run's row of runs.csv, its rows of steps.csv: one per studied step it has files for)."""
  run = {k: v for k, v in kappa_results.read_run(run_dir, draws).items() if k in RUN_KEYS}
  run["kappa_bits"] = round(run["kappa_bits"], 6)
  metrics = read_rows(run_dir)
  evals = {r["step"]: r for r in metrics if "eval_ce" in r}
  rows = []
  for step in kappa_time.STUDY_STEPS:
    paths = [os.path.join(run_dir, f"{kind}_{step}.json") for kind in ("zstudy", "shared_z")]
    if step not in evals or not all(os.path.exists(p) for p in paths):
      continue
    zstudy, shared = (read_json(p) for p in paths)
    ev = evals[step]
    row = {"run": run["run"], "seed": run["seed"], "kappa_bits": run["kappa_bits"], "step": step,
           "eval_z_use": ev["eval_z_use"], "eval_ce": ev["eval_ce"],
           "eval_kl_bits": ev["eval_kl"] / LOG2}
    for test, (within, across, p) in shared["tests"].items():
      row.update({f"{test}_within": within, f"{test}_across": across, f"{test}_p": p})
    row["position_within_minus_across"] = row["position_within"] - row["position_across"]
    strict = synthetic_study.strict_stats(zstudy["uniform_texts"], draws=draws)
    row.update(uniform_in_block_bang=strict["in_block_bang"],
               uniform_strict_well_formed=strict["strict_well_formed"],
               well_formed_uniform=zstudy["well_formed_uniform"])
    row["stage"], near = stage(row)
    row["near_0.05"] = "; ".join(near)
    rows.append(row)
  by_step = {r["step"]: r["stage"] for r in rows}
  for step in kappa_time.STUDY_STEPS:
    run[f"stage_{step}"] = by_step.get(step, "")
  run["complete"] = len(rows) == len(kappa_time.STUDY_STEPS)
  run["moves_along"] = run["complete"] and moves_along([by_step[s] for s in kappa_time.STUDY_STEPS])
  return run, rows


def moves_along(stages):
  """The protocol's per-run rule: the stage never goes back and ends later than it starts."""
  if any(s not in STAGES for s in stages):
    return False
  order = [STAGES.index(s) for s in stages]
  return all(a <= b for a, b in zip(order, order[1:])) and order[-1] > order[0]


def changes(steps):
  """Per κ and measure: the first-to-last studied step change, paired by run, with its 95 %
  t-interval over the runs that have both steps."""
  first, last = kappa_time.STUDY_STEPS[0], kappa_time.STUDY_STEPS[-1]
  at = {(r["run"], r["step"]): r for r in steps}
  out = []
  for kappa in sorted({r["kappa_bits"] for r in steps}):
    runs = sorted({r["run"] for r in steps if r["kappa_bits"] == kappa})
    pairs = [(at[(n, first)], at[(n, last)]) for n in runs if (n, first) in at and (n, last) in at]
    for m in MEASURES:
      diffs = [b[m] - a[m] for a, b in pairs if a[m] is not None and b[m] is not None]
      mean, low, high = t_interval(diffs)
      out.append({"kappa_bits": kappa, "measure": m, "runs": len(diffs),
                  "changes": " ".join(f"{d:+.4f}" for d in diffs), "mean": mean,
                  "low": low, "high": high,
                  "inside_noise": "" if low is None else low <= 0 <= high})
  return out


def verdicts(runs):
  """One line per κ: moves along (at least MOVES_SEEDS of its seeds) or not."""
  lines = []
  for kappa in sorted({r["kappa_bits"] for r in runs}):
    rs = [r for r in runs if r["kappa_bits"] == kappa]
    done, moving = sum(r["complete"] for r in rs), sum(r["moves_along"] for r in rs)
    if done < len(kappa_time.SEEDS):
      words = f"incomplete: {done} of {len(kappa_time.SEEDS)} runs have every studied step"
    elif moving >= MOVES_SEEDS:
      words = f"moves along with training time ({moving} of {done} seeds)"
    else:
      words = f"does not move along with training time ({moving} of {done} seeds)"
    lines.append(f"κ = {kappa:g} bit: {words}")
  return lines


def check(runs, earlier_path):
  """The final eval rows beside an earlier results.json's per-bit free-bits runs of the same
  seed and κ (eval CE, ELBO, KL in bits, Z use; this − earlier), and the train KL of step 1
  (where two runs of one config first part)."""
  earlier = {(r["seed"], round(r["kappa_bits"], 6)): r for r in read_json(earlier_path)["runs"]
             if r.get("post_sampler") == "bits" and r.get("kl_control") == "free_bits"}
  out = []
  for run in runs:
    e = earlier.get((run["seed"], run["kappa_bits"]))
    if e is None or run.get("eval_step") is None:
      continue
    row = {"run": run["run"], "earlier_run": e["run"], "step": run["eval_step"],
           "earlier_step": e.get("eval_step"),
           "train_kl_bits_first_step": run.get("train_kl_bits_first_step"),
           "earlier_train_kl_bits_first_step": e.get("train_kl_bits_first_step")}
    for m in FINAL:
      row[m], row[f"earlier_{m}"] = run.get(m), e.get(m)
      if row[m] is not None and row[f"earlier_{m}"] is not None:
        row[f"{m}_diff"] = row[m] - row[f"earlier_{m}"]
    out.append(row)
  return out


def fmt(value, digits=4, sign=""):
  return "–" if value is None or value == "" else f"{value:{sign}.{digits}f}"


def markdown(runs, steps, changed, checked, device):
  lines = [f"Runs of experiments/kappa_time.py ({device or 'device not given'}); stages and rules "
           "of PROTOCOL.md.", "", "## Stages", "",
           "| run | " + " | ".join(f"step {s}" for s in kappa_time.STUDY_STEPS) + " | moves along |",
           "|---" * (len(kappa_time.STUDY_STEPS) + 2) + "|"]
  for r in runs:
    lines.append(f"| {r['run']} | " + " | ".join(r[f"stage_{s}"] or "–" for s in
                                                 kappa_time.STUDY_STEPS)
                 + f" | {'yes' if r['moves_along'] else 'no'} |")
  lines += ["", "## Measures at each studied step", "",
            "| run | step | Z use (nats) | KL (bits) | position within − across (p) | distance p "
            "| '!' overlap p | in-block '!' | strict | stage | p near 0.05 |", "|---" * 11 + "|"]
  for r in steps:
    lines.append(
        f"| {r['run']} | {r['step']} | {fmt(r['eval_z_use'])} | {fmt(r['eval_kl_bits'], 3)} | "
        f"{fmt(r['position_within_minus_across'], 3, '+')} ({r['position_p']:.4f}) | "
        f"{r['distance_p']:.4f} | {r['noise_p']:.4f} | {fmt(r['uniform_in_block_bang'], 3)} | "
        f"{fmt(r['uniform_strict_well_formed'], 2)} | {r['stage']} | {r['near_0.05'] or '–'} |")
  first, last = kappa_time.STUDY_STEPS[0], kappa_time.STUDY_STEPS[-1]
  lines += ["", f"## Change from step {first} to {last} (paired by run, 95 % t-interval)", "",
            "| κ (bits) | measure | runs | changes | mean [95 % CI] | inside the noise |",
            "|---" * 6 + "|"]
  for c in changed:
    ci = "–" if c["low"] is None else (f"{c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]")
    noise = {True: "yes", False: "no", "": "–"}[c["inside_noise"]]
    lines.append(f"| {c['kappa_bits']:g} | {c['measure']} | {c['runs']} | {c['changes'] or '–'} "
                 f"| {ci} | {noise} |")
  if checked:
    lines += ["", "## Repeat check: final eval rows against the earlier runs", "",
              "| run | step | eval CE (earlier) | ELBO (earlier) | KL bits (earlier) | Z use (earlier) "
              "| step-1 train KL bits (earlier) |", "|---" * 7 + "|"]
    for c in checked:
      cells = [f"{fmt(c[m])} ({fmt(c[f'earlier_{m}'])})" for m in
               FINAL]
      first = (f"{fmt(c['train_kl_bits_first_step'], 8)} "
               f"({fmt(c['earlier_train_kl_bits_first_step'], 8)})")
      lines.append(f"| {c['run']} | {c['step']} | " + " | ".join(cells) + f" | {first} |")
  lines += ["", "## Verdicts", ""] + [f"- {v}" for v in verdicts(runs)]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, help="A directory of kappa_time runs.")
  parser.add_argument("--out", required=True)
  parser.add_argument("--device", default="", help="Which machine ran them (recorded).")
  parser.add_argument("--check", help="An earlier kappa_results results.json to compare the "
                      "final eval rows with.")
  parser.add_argument("--draws", type=int, default=10000, help="Permutations of the KS test.")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.root):
    parser.error(f"--root: no directory {args.root}")
  if args.check and not os.path.isfile(args.check):
    parser.error(f"--check: no file {args.check}")
  runs, steps = [], []
  for name in sorted(os.listdir(args.root)):
    run_dir = os.path.join(args.root, name)
    if os.path.exists(os.path.join(run_dir, "config.json")):
      run, rows = read_run(run_dir, args.draws)
      runs.append(run)
      steps += rows
  if not runs:
    parser.error(f"--root: no runs in {args.root}")
  runs.sort(key=lambda r: (r["kappa_bits"], r["seed"]))
  steps.sort(key=lambda r: (r["kappa_bits"], r["seed"], r["step"]))
  changed = changes(steps)
  checked = check(runs, args.check) if args.check else []
  os.makedirs(args.out, exist_ok=True)
  write_csv(os.path.join(args.out, "steps.csv"), steps)
  write_csv(os.path.join(args.out, "runs.csv"), runs)
  write_csv(os.path.join(args.out, "changes.csv"), changed)
  if checked:
    write_csv(os.path.join(args.out, "check.csv"), checked)
  table = markdown(runs, steps, changed, checked, args.device)
  with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
    f.write(table)
  print(table, end="")


if __name__ == "__main__":
  main()
