"""The synthetic study: the baseline, κ (bits per token) × H, and the per-bit post-sampler.

  python -m launch.sweep --config=experiments/synthetic_sweep.py --workdir=runs/synthetic_sweep
"""

from experiments import synthetic

KAPPA_BITS = (1 / 64, 1 / 16, 1 / 4, 1, 4)  # from "Z unused" to "Z copies" (arXiv 2510.17558)
NUM_BITS = (4, 8, 16)


def get_config():
  return synthetic.get_config()


def get_sweep():
  points = [{"model.latent.enabled": False}]
  points += [{"model.latent.num_bits": h, "model.latent.kappa_bits": k}
             for h in NUM_BITS for k in KAPPA_BITS]
  points += [{"model.latent.num_bits": 16, "model.latent.kappa_bits": k,
              "model.latent.post_sampler": "bits"} for k in (1 / 4, 1)]  # the factored map
  return points
