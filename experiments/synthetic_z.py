"""The README's main job: the synthetic task with a config under which, within about five minutes
on a 2-core CPU, the decoder learns to read Z, so that samples sharing a Z draw share their block
position. The run ends by printing samples grouped by shared Z draws and the share of pairs with
the same block position within and across groups (ftjax.zdiag.show_shared_z_samples).

Differences from experiments/synthetic.py (the paper-like study config): the per-bit
post-sampler (H × D instead of 2^H × D: about 2× faster steps here), a random (not zero) initial
post-sampler so that the encoder gets a gradient from the first step, 16 sequences per step, a
higher learning rate and more steps. experiments/results/main_job/ has the measured curve.
"""

from experiments import synthetic


def get_config():
  c = synthetic.get_config()
  c.model.latent.post_sampler = "bits"
  c.model.latent.zero_init_post_sampler = False
  c.model.latent.kappa_bits = 1.0
  c.train.batch_size = 16
  c.train.lr = 3e-3
  c.train.warmup_steps = 50
  c.train.steps = 1500
  c.train.log_every = 50
  c.train.eval_every = 100
  c.train.num_samples = 8
  return c
