"""A short check of the target-rate KL controller on the synthetic task: targets 1/16,
1/4 and 1 bit per token and fixed κ = 1 bit (free bits) for comparison, 3 seeds, per-bit
post-sampler, H = 16. Short enough for the 2-core CPU; experiments/kappa_study.py has the
3000-step version for a GPU.

  python -m launch.sweep --config=experiments/controller_check.py --workdir=runs/controller_check \
      --in_process
  python -m experiments.kappa_results --root=runs/controller_check \
      --out=experiments/results/controller_check --device="2-core CPU (shared)"

The running KL is the train `kl` logged every 10 steps, averaged over the second half.
"""

from experiments import synthetic

TARGET_BITS = (1 / 16, 1 / 4, 1)
SEEDS = (0, 1, 2)


def get_config():
  c = synthetic.get_config()
  c.model.latent.post_sampler = "bits"
  c.train.batch_size = 16
  c.train.steps = 300
  c.train.warmup_steps = 50
  c.train.log_every = 10
  c.train.eval_every = 300
  c.train.num_samples = 0
  c.train.peak_flops = 1e12
  return c


def get_sweep():
  points = []
  for seed in SEEDS:
    points += [{"seed": seed, "model.latent.kl_control": "target_rate",
                "model.latent.target_bits": t} for t in TARGET_BITS]
    points.append({"seed": seed, "model.latent.kappa_bits": 1.0})
  return points
