"""The default config of `launch.import_hf`: continued training of a pretrained Llama.

The model's architecture (layers, widths, heads, vocabulary, RoPE, norm eps) comes from the
checkpoint's config.json; this file sets what the checkpoint does not say: sequence length,
the latent (off: the imported model as it is; `--config.model.latent.enabled=True` retrofits a
Free Transformer), optimizer and data. Data: byte-level Shakespeare crops in memory, a
placeholder that runs anywhere; point `data` at the corpus you train on.
"""

from ftjax.configs import default_config


def get_config():
  c = default_config()
  c.data.name = "shakespeare"
  c.data.loader = "memory"
  c.model.seq_len = 256
  c.model.latent.enabled = False
  c.model.latent.num_bits = 16
  c.model.latent.kappa_bits = 0.5
  c.train.steps = 1000
  c.train.batch_size = 8
  c.train.lr = 1e-4  # fine-tuning rate: the decoder is pretrained
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.0
  c.train.eval_every = 250
  c.train.num_samples = 2
  c.checkpoint.every_steps = 250
  return c
