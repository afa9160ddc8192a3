"""A 2 × 2 sweep of tiny runs, for tests/test_sweep.py.

The points differ only in host-side settings, so all four share one compiled step (and the
persistent compile cache): the test exercises the driver, not the model.
"""

from experiments import tiny


def get_config():
  c = tiny.get_config()
  c.train.num_samples = 0
  c.train.peak_flops = 1e9
  c.checkpoint.every_steps = 5
  return c


def get_sweep():
  return [{"train.log_every": n, "train.eval_batches": k} for n in (2, 5) for k in (1, 2)]
