"""Train-step throughput of ftjax vs x-transformers (PyTorch) on the same shapes, side by side.

  pip install -r benchmarks/requirements-compare.txt
  python -m benchmarks.compare_xtransformers [--sizes=small,medium] [--num_bits=8,16] [--repeats=10]

Four implementations per size: ftjax baseline, ftjax Free Transformer, an x-transformers decoder
(`TransformerWrapper` + `Decoder`) and x-transformers' `FreeTransformer`, all with the same width,
depth (L decoder blocks; the FT adds one encoder block), heads / KV heads, SwiGLU MLP without
biases, RMSNorm, RoPE, untied embeddings, batch, sequence length and fp32 AdamW steps on random
tokens. PyTorch uses scaled_dot_product_attention (`attn_flash`) and as many threads as jax
(all cores). Each point runs in its own child process, one at a time, so that the two frameworks
never share the cores.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from benchmarks import common

IMPLS = ("ftjax_base", "ftjax_ft", "xt_base", "xt_ft")
_SIZES = flags.DEFINE_list("sizes", ["small", "medium"], f"Among {list(common.SIZES)}.")
_BITS = flags.DEFINE_list("num_bits", ["8", "16"], "H values for the two Free Transformers.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per point (after two warm-ups).")
_WORKER = flags.DEFINE_enum("worker", None, IMPLS, "Internal: run one point and print JSON.")
_SIZE = flags.DEFINE_string("size", "small", "Internal: the worker's size.")
_H = flags.DEFINE_integer("h", 16, "Internal: the worker's H.")


def _timed(step, repeats):
  step()
  step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return sorted(times)


def ftjax_times(size, latent, h, repeats):
  return _timed(common.train_step_fn(common.size_config(size, latent, h)), repeats)


def xt_model(size, latent, h):
  """The x-transformers model of `size`: a decoder, or a FreeTransformer with H = h."""
  from x_transformers import Decoder, TransformerWrapper
  from x_transformers.free_transformer import FreeTransformer
  layers, d, heads, kv, mlp, _, seq = common.SIZES[size]
  shared = dict(attn_dim_head=d // heads, heads=heads, attn_kv_heads=kv, attn_flash=True,
                ff_glu=True, ff_swish=True, ff_mult=mlp / d, ff_no_bias=True)
  if latent:
    return FreeTransformer(num_tokens=264, dim=d, dec_head_depth=layers // 2,
                           dec_tail_depth=layers - layers // 2, max_seq_len=seq, enc_depth=1,
                           latent_bits=h, **shared)
  return TransformerWrapper(num_tokens=264, max_seq_len=seq, use_abs_pos_emb=False,
                            attn_layers=Decoder(dim=d, depth=layers, rotary_pos_emb=True,
                                                use_rmsnorm=True, **shared))


def xt_times(size, latent, h, repeats):
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  _, _, _, _, _, batch, seq = common.SIZES[size]
  model = xt_model(size, latent, h).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  tokens = torch.randint(3, 264, (batch, seq + 1))

  def loss_fn():
    if latent:
      return model(tokens)  # CE + KL, shifted inside
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

  def step():
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  return _timed(step, repeats)


def run_worker():
  impl, size, h, repeats = _WORKER.value, _SIZE.value, _H.value, _REPEATS.value
  fn = ftjax_times if impl.startswith("ftjax") else xt_times
  times = fn(size, impl.endswith("_ft"), h, repeats)
  print("RESULT " + json.dumps(times))


def measure(impl, size, h):
  cmd = [sys.executable, "-m", "benchmarks.compare_xtransformers", f"--worker={impl}",
         f"--size={size}", f"--h={h}", f"--repeats={_REPEATS.value}"]
  out = subprocess.run(cmd, capture_output=True, text=True)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode or not lines:
    sys.exit(f"benchmark point {impl}/{size}/H={h} failed:\n{out.stderr[-2000:]}")
  times = json.loads(lines[-1][len("RESULT "):])
  return times[len(times) // 2], times[0], times[-1]


def main(argv):
  del argv
  if _WORKER.value:
    return run_worker()
  import importlib.metadata

  import torch
  rows = []
  for size in _SIZES.value:
    layers, d, _, _, _, batch, seq = common.SIZES[size]
    tokens = batch * seq
    points = [("ftjax_base", "xt_base", None)] + [("ftjax_ft", "xt_ft", int(h)) for h in _BITS.value]
    for ours, theirs, h in points:
      t_ours, t_theirs = measure(ours, size, h or 16), measure(theirs, size, h or 16)
      model = f"FT H={h}" if h else "baseline"
      rows.append([size, model, layers, d, f"{batch}×{seq}",
                   f"{tokens / t_ours[0]:,.0f} ({tokens / t_ours[2]:,.0f}–{tokens / t_ours[1]:,.0f})",
                   f"{tokens / t_theirs[0]:,.0f} ({tokens / t_theirs[2]:,.0f}–{tokens / t_theirs[1]:,.0f})",
                   f"{t_theirs[0] / t_ours[0]:.2f}×"])
  table = common.markdown_table(
      ["size", "model", "L", "D", "B×T", "ftjax tokens/s (range)", "x-transformers tokens/s (range)",
       "ftjax / x-transformers"], rows)
  common.record("ftjax vs x-transformers, train step (fp32, CPU)", table,
                f"torch {torch.__version__} ({torch.get_num_threads()} threads), x-transformers "
                f"{importlib.metadata.version('x-transformers')}"
                f"; median of {_REPEATS.value} timed steps per point, each point in its own "
                f"process. x-transformers' FreeTransformer builds the one-hot code vector "
                f"(N × 2^H) and multiplies it by the 2^H × D table in the forward pass; ftjax "
                f"gathers the row and touches all 2^H codes only in the backward, chunk by chunk.")


if __name__ == "__main__":
  app.run(main)
