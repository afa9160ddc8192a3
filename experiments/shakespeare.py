"""A small byte-level Free Transformer on the Gutenberg Shakespeare corpus."""

from ftjax.configs import default_config


def get_config():
  c = default_config()
  c.data.name = "shakespeare"
  c.data.loader = "grain"  # tfds array_record corpus, prepared at first use; documents packed
  c.model.num_layers = 6
  c.model.d_model = 256
  c.model.num_heads = 8
  c.model.num_kv_heads = 4
  c.model.mlp_dim = 768
  c.model.vocab_size = 264  # 259 byte tokens, padded to a multiple of 8
  c.model.seq_len = 256
  c.model.latent.num_bits = 16
  c.model.latent.kappa_bits = 0.5
  c.train.steps = 3000
  c.train.batch_size = 32
  c.train.lr = 1e-3
  c.train.warmup_steps = 200
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.eval_batches = 8
  c.train.num_samples = 4
  c.checkpoint.every_steps = 500
  return c
