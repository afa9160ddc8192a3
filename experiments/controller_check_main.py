"""The target-rate KL controller checked at the README main job's config: targets 1/16,
1/4 and 1 bit per token, β = 0.01 until the warm-up ends, and fixed κ = 1 bit (free bits) for
comparison, 3 seeds, 1200 steps, per-bit post-sampler started at random, H = 16. It replaces the
300-step check (controller_check.py), which stopped before the controller settles.

  python -m launch.sweep --config=experiments/controller_check_main.py \
      --workdir=runs/controller_check_main --in_process [--only=REGEX]
  python -m experiments.kappa_results --root=runs/controller_check_main \
      --out=experiments/results/controller_check_main --device="2-core CPU"

The running KL is the train `kl` logged every 10 steps, averaged over the second half.
"""

from experiments import synthetic_z
from experiments.controller_check import SEEDS, TARGET_BITS


def get_config():
  c = synthetic_z.get_config()
  c.train.log_every = 10
  c.train.eval_every = 1200
  c.train.num_samples = 0
  return c


def get_sweep():
  points = []
  for seed in SEEDS:
    points += [{"seed": seed, "model.latent.target_bits": t} for t in TARGET_BITS]
    points.append({"seed": seed, "model.latent.kl_control": "free_bits",
                   "model.latent.kappa_bits": 1.0})
  return points
