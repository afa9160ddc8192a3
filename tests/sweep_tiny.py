"""A 2 × 2 sweep of tiny runs, for tests/test_sweep.py."""

from experiments import tiny


def get_config():
  c = tiny.get_config()
  c.train.steps = 6
  c.train.eval_every = 6
  c.train.num_samples = 0
  c.train.peak_flops = 1e9
  c.checkpoint.every_steps = 2
  return c


def get_sweep():
  return [{"model.latent.num_bits": h, "model.latent.kappa_bits": k}
          for h in (2, 4) for k in (0.25, 1.0)]
