"""Cached decoding vs re-running the full forward for every token (tokens/s).

  python -m benchmarks.decode [--new_tokens=512] [--batches=1,16] [--repeats=3]

Baseline and Free Transformer (Z uniform per token) of the same shape; the prompt is 8 tokens.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import common
from ftjax import sampling
from ftjax.configs import default_config, resolve
from ftjax.model import make_model
from ftjax.train import init_params

_NEW = flags.DEFINE_integer("new_tokens", 512, "Tokens generated per sequence.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs of cached decoding per point.")
_NAIVE_REPEATS = flags.DEFINE_integer("naive_repeats", 2, "Timed runs of the full-forward "
                                      "reference (minutes each at batch 16 on a CPU).")
PROMPT = 8


def make_config(latent):
  c = default_config()
  c.data.name = "shakespeare"  # validation only; nothing is read
  c.model.update(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, mlp_dim=384,
                 vocab_size=264, seq_len=PROMPT + _NEW.value)
  c.model.latent.update(enabled=latent, num_bits=16, kappa_bits=0.5,
                        zero_init_post_sampler=False)
  return resolve(c)


def main(argv):
  del argv
  rows = []
  for latent in (False, True):
    cfg = make_config(latent)
    model, decode_model = make_model(cfg.model), make_model(cfg.model, decode=True)
    params = init_params(model, 0)
    for batch in map(int, _BATCHES.value):
      prompt = jax.random.randint(jax.random.key(1), (batch, PROMPT), 3, 259)
      buffer = jnp.zeros((batch, PROMPT + _NEW.value), jnp.int32).at[:, :PROMPT].set(prompt)
      start = jnp.zeros((batch,), jnp.int32)
      # Compiled ahead of time, so that no timed call (nor a warm-up run) includes compilation.
      cached = sampling.generate.lower(decode_model, params, prompt, start, jax.random.key(0),
                                       max_new_tokens=_NEW.value).compile()
      naive = sampling.sample_full_forward.lower(model, params, buffer, jax.random.key(0),
                                                 prompt_len=PROMPT).compile()
      times = {
          "cached": common.time_calls(lambda: jax.block_until_ready(
              cached(params, prompt, start, jax.random.key(0))), _REPEATS.value),
          "full forward": common.time_calls(lambda: jax.block_until_ready(
              naive(params, buffer, jax.random.key(0))), _NAIVE_REPEATS.value),
      }
      tokens = batch * _NEW.value
      for name, (med, lo, hi) in times.items():
        rows.append(["FT" if latent else "baseline", batch, name, f"{med:.2f}",
                     f"{lo:.2f}–{hi:.2f}", f"{tokens / med:,.0f}",
                     f"{times['full forward'][0] / med:.1f}x" if name == "cached" else ""])
      print(rows[-2], rows[-1], flush=True)
  table = common.markdown_table(["model", "batch", "decoding", "seconds (median)", "min–max",
                                 "new tokens/s", "speed-up"], rows)
  common.record(f"Decoding {_NEW.value} new tokens: KV cache vs full forward per token", table,
                f"L=4, D=128, 4 heads / 2 KV heads, vocab 264, prompt {PROMPT} tokens; FT with "
                f"H=16 and Z uniform per token. Timed runs per point: {_REPEATS.value} cached, "
                f"{_NAIVE_REPEATS.value} full forward.")


if __name__ == "__main__":
  app.run(main)
