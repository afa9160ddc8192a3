"""The synthetic study: the baseline plus κ (bits per token) × H.

  python -m launch.sweep --config=experiments/synthetic_sweep.py --workdir=runs/synthetic_sweep
"""

from experiments import synthetic

KAPPA_BITS = (1 / 64, 1 / 16, 1 / 4, 1, 4)  # PAPER_NUMBERS.md: from "Z unused" to "Z copies"
NUM_BITS = (4, 8, 16)


def get_config():
  return synthetic.get_config()


def get_sweep():
  points = [{"model.latent.enabled": False}]
  points += [{"model.latent.num_bits": h, "model.latent.kappa_bits": k}
             for h in NUM_BITS for k in KAPPA_BITS]
  return points
