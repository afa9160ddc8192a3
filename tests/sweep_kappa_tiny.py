"""Two tiny points that differ only in κ, for tests/test_kl_control.py (launch.sweep --in_process)."""

import os

from experiments import tiny


def get_config():
  c = tiny.get_config()
  c.train.num_samples = 0
  c.train.peak_flops = 1e9
  return c


def get_sweep():
  return [{"model.latent.kappa_bits": k} for k in (0.25, 1)]


def after_point(trainer, state, workdir):
  del trainer
  with open(os.path.join(workdir, "after_point.txt"), "w", encoding="utf-8") as f:
    f.write(str(int(state.step)))
