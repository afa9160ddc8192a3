"""Training time at fixed κ: at a fixed κ, does a per-bit run move along nothing → position → noise →
broken generation with training time, within one schedule and one device? Per-bit κ ∈ {1/4, 1}
bit × seeds 0–2 on the synthetic task (experiments/kappa_study.py's config: H = 16, 3000 steps),
with samples and the shared-Z tests of the same runs at steps 1000, 2000 and 3000.

  python -m launch.sweep --config=experiments/kappa_time.py --workdir=runs/kappa_time --in_process
  python -m experiments.kappa_time --root=runs/kappa_time   # the files a run lacks, from checkpoints

Every 1000th step's checkpoint is kept (checkpoint.keep_period). For each of those steps,
`after_point` restores its parameters and writes <run>/zstudy_<step>.json
(synthetic_study.study_state with its texts: what kappa_results reads from zstudy.json) and
<run>/shared_z_<step>.json (the main job's shared-Z tests: 16 Z draws × 8 samples, texts and
results). A file already there is kept. κ is the run's config.json's (a trainer shared across κ
under --in_process carries the first point's κ in its own config).
"""

import argparse
import json
import os

from experiments import kappa_study

KAPPA_BITS = (1 / 4, 1)
SEEDS = (0, 1, 2)
STUDY_STEPS = (1000, 2000, 3000)
STUDY_Z = (8, 8)  # zstudy: Z draws × samples per draw (kappa_study's)
SHARED_Z = (16, 8)  # the shared-Z tests: Z draws × samples per draw (the main job's)


def get_config():
  c = kappa_study.get_config()
  c.model.latent.post_sampler = "bits"
  c.checkpoint.every_steps = STUDY_STEPS[0]
  c.checkpoint.keep_period = STUDY_STEPS[0]
  return c


def get_sweep():
  """Seed-major, so that the two κ of a seed share one compilation (--in_process)."""
  return [{"seed": s, "model.latent.kappa_bits": k} for s in SEEDS for k in KAPPA_BITS]


def params_at(trainer, workdir, step):
  """The run's parameters saved at `step`."""
  from ftjax import checkpoint, run
  manager = checkpoint.Manager(run.checkpoints_dir(workdir), read_only=True)
  try:
    return manager.restore_params(step, trainer.abstract_state().params)
  finally:
    manager.close()


def write_json(path, value):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)


def write_studies(trainer, state, workdir):
  """zstudy_<step>.json and shared_z_<step>.json of `state` (a train state at that step)."""
  from experiments import synthetic_study
  from ftjax import zdiag
  step = int(state.step)
  path = os.path.join(workdir, f"zstudy_{step}.json")
  if not os.path.exists(path):
    result, _ = synthetic_study.study_state(trainer, state, os.path.basename(workdir), *STUDY_Z,
                                            seed=0, keep_texts=True)
    write_json(path, result)
  path = os.path.join(workdir, f"shared_z_{step}.json")
  if not os.path.exists(path):
    texts, groups = zdiag.shared_z_samples(trainer, state.params, *SHARED_Z)
    write_json(path, {"step": step, "texts": texts, "groups": groups,
                      "tests": zdiag.shared_z_tests(texts, groups)})


def after_point(trainer, state, workdir):
  """The studies at every step of STUDY_STEPS the run has reached (stopped runs too)."""
  for step in STUDY_STEPS:
    if step < int(state.step):
      write_studies(trainer, state.replace(step=step, params=params_at(trainer, workdir, step)),
                    workdir)
    elif step == int(state.step):
      write_studies(trainer, state, workdir)


def main(argv=None):
  parser = argparse.ArgumentParser(description="Writes the studies that the finished runs of a "
                                   "kappa_time sweep lack, from their kept checkpoints.")
  parser.add_argument("--root", required=True, help="The sweep's --workdir.")
  args = parser.parse_args(argv)
  from ftjax import run
  from ftjax.trainer import load_run
  for name in sorted(os.listdir(args.root)):
    workdir = os.path.join(args.root, name)
    if run.is_finished(workdir):
      trainer, state = load_run(workdir)
      after_point(trainer, state, workdir)
      print(f"{workdir}: studies written", flush=True)


if __name__ == "__main__":
  main()
