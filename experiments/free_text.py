"""Is the latent free on text at small rates? The pre-registered comparison
(experiments/results/free_text/PROTOCOL.md fixes the rules; do not tune after looking):

  python -m launch.sweep --config=experiments/free_text.py --workdir=runs/free_text --in_process
  python -m experiments.free_text --root=runs/free_text   # IW bounds a run lacks, from checkpoints
  python -m experiments.free_text_results --root=runs/free_text \
      --out=experiments/results/free_text --device="..."

Shakespeare with experiments/text_sweep.py's set-up (byte tokens, L = 4, D = 128, H = 12, 32 rows
of 128 tokens, lr 2e-3, 40 warm-up steps), 1000 steps, 32 eval batches. Arms, seeds 0-5 each:
  (a) the baseline with one more block (5 blocks: the equal-compute control),
  (b) the FT with the main job's latent settings (experiments/synthetic_z.py: per-bit map started
      at random, target-rate KL control from β = 0.01) at target_bits = 1/16,
  (c) the same at target_bits = 1/4,
  (d) the plain baseline (4 blocks), for reference.
The arms of a seed see the same training batches in the same order and are evaluated on the same
validation batches with the same keys (the streams depend only on data.*, model.seq_len,
train.batch_size and the seed; the eval keys on the seed). `after_point` writes the
importance-weighted bound (K = 16 encoder samples per sequence) of each finished FT on those
batches to <run>/iw_bound.json; with --in_process, (b) and (c) of a seed share one compilation.
"""

import argparse
import json
import os

from experiments import text_sweep

SEEDS = tuple(range(6))
TARGET_BITS = (1 / 16, 1 / 4)  # arms (b) and (c)
IW_SAMPLES = 16
IW_KS = (1, 4, 16)
IW_FILE = "iw_bound.json"


def get_config():
  c = text_sweep.get_config()
  lat = c.model.latent
  lat.post_sampler = "bits"
  lat.zero_init_post_sampler = False
  lat.kappa_bits = None
  lat.kl_control = "target_rate"
  lat.target_bits = TARGET_BITS[1]
  lat.control_beta_init = 0.01
  c.train.steps = 1000
  c.train.eval_batches = 32
  c.train.eval_every = 250
  c.checkpoint.every_seconds = 60.0  # resumable mid-point
  return c


def arm_points(seed):
  """The four arms of one seed, in the order (a), (d), (b), (c)."""
  return [{"seed": seed, "model.latent.enabled": False, "model.num_layers": 5},
          {"seed": seed, "model.latent.enabled": False},
          *({"seed": seed, "model.latent.target_bits": t} for t in TARGET_BITS)]


def get_sweep():
  return [p for seed in SEEDS for p in arm_points(seed)]


def write_iw_bound(trainer, params, workdir, step):
  """<workdir>/iw_bound.json: the IW bounds of `params` (the run at `step`) on the eval batches."""
  from ftjax import iw_bound
  out = iw_bound.evaluate(trainer, params, IW_SAMPLES, ks=IW_KS)
  with open(os.path.join(workdir, IW_FILE), "w", encoding="utf-8") as f:
    json.dump({"step": step, **out}, f, indent=1)


def after_point(trainer, state, workdir):
  """The IW bound of a FT that reached its last step (not of one stopped early)."""
  step = int(state.step)
  if trainer.cfg.model.latent.enabled and step == trainer.cfg.train.steps:
    write_iw_bound(trainer, state.params, workdir, step)


def is_ft(workdir):
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    return json.load(f)["model"]["latent"]["enabled"]


def missing_iw(root):
  """The finished FT runs under `root` without an IW file."""
  from ftjax import run
  workdirs = (os.path.join(root, name) for name in sorted(os.listdir(root)))
  return [w for w in workdirs if run.is_finished(w) and is_ft(w)
          and not os.path.exists(os.path.join(w, IW_FILE))]


def main(argv=None):
  parser = argparse.ArgumentParser(description="Writes iw_bound.json for the finished FT runs "
                                   "of a free_text sweep that lack it (from their last step).")
  parser.add_argument("--root", required=True, help="The sweep's --workdir.")
  args = parser.parse_args(argv)
  from ftjax.trainer import load_run
  for workdir in missing_iw(args.root):
    trainer, state = load_run(workdir)
    write_iw_bound(trainer, state.params, workdir, int(state.step))
    print(f"{workdir}: {IW_FILE} written", flush=True)


if __name__ == "__main__":
  main()
