"""Metric writers (JSON lines + TensorBoard), analytic FLOP counts and MFU.

FLOPs are counted analytically (XLA's cost analysis counts a scan body once): a multiply-add is
2 FLOPs, training is forward + backward = 3 × forward for every matmul, and attention is counted
over the full T × T score matrix, as computed.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def block_matmul_params(m):
  """Weights per decoder block that enter matmuls (attention + SwiGLU)."""
  d, n, k, e, f = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
  return 2 * d * n * e + 2 * d * k * e + 3 * d * f


def flops_per_token(m, seq_len=None, training=True):
  """Analytic FLOPs per token of a train step (or a forward pass with training=False).

  The Free Transformer adds the encoder block, the D → H readout and the post-sampler, whose
  backward costs 2·D·2^H (dR Wᵀ against every code) plus O(H·2^H) for G and its bit sums.
  """
  t = seq_len or m.seq_len
  attention = 4 * t * m.num_heads * m.head_dim
  per_block = 2 * block_matmul_params(m) + attention
  forward = m.num_layers * per_block + 2 * m.d_model * m.vocab_size
  backward_extra = 0
  lat = m.latent
  if lat.enabled:
    forward += per_block + 2 * m.d_model * lat.num_bits
    if lat.post_sampler == "onehot":
      codes = 2**lat.num_bits
      backward_extra = 2 * m.d_model * codes + (lat.num_bits + 3) * codes
    else:
      forward += 2 * lat.num_bits * m.d_model
  return 3 * forward + backward_extra if training else forward


def count_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def measure_matmul_peak(dtype=jnp.float32, size=4096, repeats=3):
  """Best FLOP/s of a jitted square matmul on the default device: the peak MFU is measured
  against. On CPU it uses the same thread pool as the train step (all cores)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def _truncate_after(path, step):
  """Keeps the rows of a metrics file up to `step` (a torn last line is dropped too)."""
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (json.JSONDecodeError, KeyError):
        pass
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)


class MetricWriter:
  """Appends metrics to `workdir/metrics.jsonl` and TensorBoard event files under `workdir/tb`.

  A run resumed at `resume_step` first drops the rows after that step (written by the run that
  was interrupted), so the file reads as one uninterrupted run. Only process 0 writes; other
  processes get a writer that does nothing.
  """

  def __init__(self, workdir, resume_step=0):
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # imported here: optional for library users
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if os.path.exists(path):
        _truncate_after(path, resume_step)
      self._jsonl = open(path, "a", encoding="utf-8")
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step, scalars):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)

  def write_text(self, step, tag, text):
    if self.enabled:
      self._tb.add_text(tag, text, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
