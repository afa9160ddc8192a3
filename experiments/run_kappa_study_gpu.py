"""Runs as much of the κ study (experiments/kappa_study.py) as fits in a hard time budget on one
GPU, as concurrent worker processes, then packs every run's small files into one archive.

  python3 experiments/run_kappa_study_gpu.py --root=RUNS --out=OUT [--budget_s=285] [--workers=16]
      [--only=REGEX] [--set=train.steps=3000 ...]

Each point of the sweep is one `python -m launch.sweep --in_process --only=^<point>$` process
(resumable; its `after_point` writes <run>/zstudy.json), started in priority order (per-bit κ
points and the baselines of every seed first, then one-hot, then the target-rate controller),
at most --workers at once, each with XLA_PYTHON_CLIENT_PREALLOCATE=false and a memory fraction
of min(0.1, 0.9 / workers); all share a persistent compilation cache under RUNS. At
budget_s − 75 s the running workers get SIGTERM (the loop saves a checkpoint and returns, and the
sweep samples the model at the step it reached), and SIGKILL at budget_s − 15 s. Then OUT gets kappa_study_runs.tar.gz (config.json, metrics.jsonl,
zstudy.json and the log of every run; no checkpoints) and summary.csv (status and last metrics of
every point). Ingest it with `python -m experiments.kappa_results --archive=OUT/kappa_study_runs.tar.gz`.
"""

import argparse
import csv
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: the sweep file imports `experiments`
  sys.path.insert(0, REPO)
SWEEP = "experiments/kappa_study.py"
KEEP_FILES = ("config.json", "metrics.jsonl", "zstudy.json", "train.log")
SUMMARY_KEYS = ("step", "kl", "kl_beta", "kl_ema", "eval_ce", "eval_elbo", "eval_kl",
                "eval_z_use", "eval_z_mi", "eval_z_active_bits", "eval_z_code_ppl")


def point_name(overrides):
  return ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "base"


def priority(overrides):
  """Lower runs first: per-bit FT and baselines, then one-hot, then the controller."""
  if overrides.get("model.latent.kl_control") == "target_rate":
    return 2
  if overrides.get("model.latent.post_sampler") == "onehot":
    return 1
  return 0


def load_points(sweep):
  spec = importlib.util.spec_from_file_location("sweep", os.path.join(REPO, sweep))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  points = module.get_sweep()
  return sorted(points, key=lambda p: (priority(p), p.get("seed", 0)))  # stable within


def last_metrics(run_dir):
  from ftjax.metrics import read_rows
  out = {}
  for row in read_rows(run_dir):
    out.update({k: v for k, v in row.items() if k in SUMMARY_KEYS})
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, help="Directory of the runs (created).")
  parser.add_argument("--out", required=True, help="Directory of the archive and summary.csv.")
  parser.add_argument("--budget_s", type=float, default=285.0, help="Hard wall-clock budget.")
  parser.add_argument("--workers", type=int, default=16, help="Concurrent processes.")
  parser.add_argument("--only", default="", help="Regex on point names.")
  parser.add_argument("--sweep", default=SWEEP)
  parser.add_argument("--set", action="append", default=[],
                      help="key=value override for every point (launch.sweep --set).")
  args = parser.parse_args(argv)
  t0 = time.monotonic()
  root, out = os.path.abspath(args.root), os.path.abspath(args.out)
  os.makedirs(root, exist_ok=True)
  os.makedirs(out, exist_ok=True)
  points = [p for p in load_points(args.sweep) if re.search(args.only, point_name(p))]
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(0.1, 0.9 / max(args.workers, 1)):.3f}"
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, ".jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  extra = ["--set=train.peak_flops=1e15"] + [f"--set={s}" for s in args.set]
  queue = list(points)
  running = {}  # name -> (Popen, log file)
  status = {point_name(p): "not started" for p in points}
  stop_at, kill_at = args.budget_s - 75.0, args.budget_s - 15.0
  print(f"{len(points)} points, {args.workers} at once, budget {args.budget_s:.0f} s", flush=True)
  stopping = False
  while queue or running:
    now = time.monotonic() - t0
    for name, (proc, log) in list(running.items()):
      if proc.poll() is not None:
        log.close()
        status[name] = "finished" if proc.returncode == 0 else f"exit {proc.returncode}"
        print(f"{now:6.0f}s [{name}] {status[name]}", flush=True)
        del running[name]
    if now >= stop_at and not stopping:
      stopping = True
      queue = []
      for name, (proc, _) in running.items():
        print(f"{now:6.0f}s [{name}] budget reached: SIGTERM", flush=True)
        proc.send_signal(signal.SIGTERM)
    if now >= kill_at:
      for name, (proc, log) in running.items():
        print(f"{now:6.0f}s [{name}] SIGKILL", flush=True)
        proc.kill()
        proc.wait()
        log.close()
        status[name] = "killed"
      running = {}
      break
    while queue and len(running) < args.workers and not stopping:
      p = queue.pop(0)
      name = point_name(p)
      run_dir = os.path.join(root, name)
      os.makedirs(run_dir, exist_ok=True)
      log = open(os.path.join(run_dir, "train.log"), "a", encoding="utf-8")
      cmd = [sys.executable, "-m", "launch.sweep", f"--config={args.sweep}", f"--workdir={root}",
             "--in_process", f"--only=^{re.escape(name)}$", *extra]
      running[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                        stderr=subprocess.STDOUT), log)
      status[name] = "running"
      print(f"{now:6.0f}s [{name}] started", flush=True)
    time.sleep(1.0)
  for name, st in status.items():
    if st.startswith("exit") or st == "killed":
      status[name] = f"{st} (stopped; last step below)"
  rows = []
  for p in points:
    name = point_name(p)
    run_dir = os.path.join(root, name)
    row = {"point": name, "status": status[name], **last_metrics(run_dir),
           "zstudy": os.path.exists(os.path.join(run_dir, "zstudy.json"))}
    rows.append(row)
  keys = ["point", "status", "zstudy"] + [k for k in SUMMARY_KEYS if any(k in r for r in rows)]
  with open(os.path.join(out, "summary.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, keys)
    writer.writeheader()
    writer.writerows(rows)
  archive = os.path.join(out, "kappa_study_runs.tar.gz")
  with tarfile.open(archive, "w:gz") as tar:
    for p in points:
      name = point_name(p)
      for fname in KEEP_FILES:
        path = os.path.join(root, name, fname)
        if os.path.exists(path):
          tar.add(path, arcname=os.path.join("kappa_study", name, fname))
  done = sum(r["status"] == "finished" for r in rows)
  print(f"{time.monotonic() - t0:.0f}s: {done}/{len(rows)} points finished; wrote {archive} and "
        f"{os.path.join(out, 'summary.csv')}", flush=True)


if __name__ == "__main__":
  main()
