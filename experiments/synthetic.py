"""The paper's synthetic task: a small Free Transformer with H = 16 that trains on CPU in minutes.

Sweep κ with --config.model.latent.kappa_bits=... (the paper's picture: Z unused at small κ,
then the block's position, then noise, then everything).
"""

from ftjax.configs import default_config


def get_config():
  c = default_config()
  c.model.num_layers = 4
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 384
  c.model.vocab_size = 32
  c.model.seq_len = 66  # BOS + letter + '>' + 64 characters, minus one for the shift
  c.model.latent.num_bits = 16
  c.model.latent.kappa_bits = 0.25
  c.train.steps = 400
  c.train.batch_size = 32
  c.train.lr = 2e-3
  c.train.warmup_steps = 100
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.eval_batches = 4
  c.train.num_samples = 12
  c.train.end_of_run = "ftjax.zdiag:shared_z_report"  # samples sharing a Z draw, and their tests
  return c
