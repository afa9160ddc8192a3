"""A tiny Free Transformer on the synthetic task: compiles in seconds, for tests."""

from ftjax.configs import default_config


def get_config():
  c = default_config()
  c.model.num_layers = 2
  c.model.d_model = 32
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 64
  c.model.vocab_size = 32
  c.model.seq_len = 66
  c.model.latent.num_bits = 4
  c.model.latent.kappa_bits = 0.25
  c.model.latent.chunk_tokens = 64
  c.train.steps = 20
  c.train.batch_size = 4
  c.train.lr = 3e-3
  c.train.warmup_steps = 2
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.eval_batches = 1
  c.train.num_samples = 2
  c.train.end_of_run = "ftjax.zdiag:shared_z_report"  # as experiments/synthetic.py
  c.mesh.data = 1  # one device; the sharding tests set their own meshes
  return c
