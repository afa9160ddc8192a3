"""The 8B Free Transformer of the paper (F. Fleuret, The Free Transformer, arXiv 2510.17558):
the Llama-3-8B shape."""

from experiments import ft_1p5b


def get_config():
  c = ft_1p5b.get_config()
  c.model.num_layers = 32
  c.model.d_model = 4096
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.mlp_dim = 14336
  c.train.lr = 3e-4
  c.train.steps = 47_700  # 200B tokens at 4M tokens per step
  return c
