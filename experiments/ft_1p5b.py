"""A 1.5B-class Free Transformer, the smaller scale of the paper (F. Fleuret, The Free Transformer,
arXiv 2510.17558), in a Llama-3-style shape whose widths are this project's choice."""

from ftjax.configs import default_config


def get_config():
  c = default_config()
  # A corpus tokenised with `python -m launch.prepare_data` (e.g. with Llama 3's tokenizer.json):
  # --config.data.path=DIR (or --config.data.mixture=dirA:0.7,dirB:0.3)
  c.data.name = "prepared"
  c.data.tokenizer = "auto"  # the prepared data's tokenizer (model.vocab_size must hold it)
  c.model.num_layers = 24
  c.model.d_model = 2048
  c.model.num_heads = 16
  c.model.num_kv_heads = 8
  c.model.mlp_dim = 5632
  c.model.vocab_size = 128_256
  c.model.seq_len = 4096
  c.model.rope_theta = 500_000.0
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "full"  # dry run: dots_no_batch needs 112 GB per device at 8B/256
  c.model.ce_chunk_tokens = 1024
  c.model.attention_q_chunk = 512
  c.model.latent.num_bits = 16
  c.model.latent.kappa_bits = 0.5
  c.model.latent.chunk_tokens = 512
  c.train.lr = 4e-4
  c.train.warmup_steps = 2000
  c.train.steps = 11_200  # 47B tokens at 4M tokens per step
  c.train.batch_size = 1024  # x 4096 tokens = 4M tokens per step
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.checkpoint.every_steps = 500
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.max_replicated_fraction = 0.05
  return c
