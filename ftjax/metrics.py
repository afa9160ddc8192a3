"""The metrics writer (JSON lines, forwarded to the trackers), analytic FLOP counts and MFU.

FLOPs are counted analytically (XLA's cost analysis counts a scan body once): a multiply-add is
2 FLOPs, training is forward + backward = 3 × forward for every matmul, and attention is counted
over the full T × T score matrix, as computed.
"""

import json
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import WriteError


def block_matmul_params(m: Any) -> int:
  """Weights per decoder block that enter matmuls (attention + SwiGLU)."""
  d, n, k, e, f = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
  return 2 * d * n * e + 2 * d * k * e + 3 * d * f


def flops_per_token(m: Any, seq_len: Optional[int] = None, training: bool = True) -> int:
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


def count_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def measure_matmul_peak(dtype: Any = jnp.float32, size: int = 4096, repeats: int = 3) -> float:
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


def display_unit(key: str) -> tuple[float, str]:
  """(divisor, unit) in which a person reads the metric `key` of metrics.jsonl (value / divisor):
  KL and mutual information in bits per token (stored in nats), CE, ELBO and Z use in nats per
  token, bpb in bits per byte; anything else (fractions, counts, rates) as stored, unit ""."""
  parts = set(key.split("_"))
  if {"kl", "mi"} & parts and not {"frac", "active"} & parts:
    return math.log(2), "bits per token"
  if {"ce", "elbo", "use"} & parts:
    return 1.0, "nats per token"
  if "bpb" in parts:
    return 1.0, "bits per byte"
  return 1.0, ""


def write_error(path: str, e: OSError, step: Optional[int] = None) -> WriteError:
  """WriteError for an OSError `e` met writing `path`."""
  where = f" at step {step}" if step is not None else ""
  error = WriteError(f"cannot write {path}{where}: {e.strerror or e}. Free space or fix the "
                     "directory's permissions, then run the same command to resume (from the "
                     "newest complete checkpoint).")
  error.errno = e.errno
  return error


def read_rows(workdir: str) -> list:
  """The rows of workdir/metrics.jsonl in the order written ([] when there is no such file); a
  line that does not parse (a torn last write) is skipped. The one reader of the file."""
  from ftjax import storage
  rows = []
  try:
    lines = storage.read_bytes(os.path.join(workdir, "metrics.jsonl")).decode().splitlines()
  except FileNotFoundError:
    return rows
  for line in lines:
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return rows


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
  """Appends metrics to `workdir/metrics.jsonl` and sends each row to `trackers`
  (ftjax.trackers: TensorBoard, wandb); a context manager that closes them all.

  A run resumed at `resume_step` first drops the rows after that step (written by the run that
  was interrupted), so the file reads as one uninterrupted run. Only process 0 writes; other
  processes get a writer that does nothing. Writes are synchronous: a row that cannot be written
  to the file (or to TensorBoard) raises WriteError at once, never goes missing silently.
  """

  def __init__(self, workdir, resume_step=0, trackers=()):
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._trackers = list(trackers) if self.enabled else []
    if self.enabled:
      self._path = os.path.join(workdir, "metrics.jsonl")
      try:
        if os.path.exists(self._path):
          _truncate_after(self._path, resume_step)
        self._jsonl = open(self._path, "a", encoding="utf-8")
      except OSError as e:
        raise write_error(self._path, e) from None

  def __enter__(self):
    return self

  def __exit__(self, kind, error, traceback):
    if error is None:
      self.close()
    else:  # the error in flight is the one to report
      try:
        self.close(failed=True)
      except WriteError:
        pass

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    try:
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    except OSError as e:
      raise write_error(self._path, e, step) from None
    for tracker in self._trackers:
      tracker.write(step, row)

  def write_text(self, step: int, tag: str, text: str) -> None:
    for tracker in self._trackers:
      tracker.write_text(step, tag, text)

  def close(self, failed: bool = False) -> None:
    """Closes the file and the trackers; WriteError if the last rows cannot be flushed."""
    trackers, self._trackers = self._trackers, []
    jsonl, self._jsonl = self._jsonl, None
    try:
      if jsonl is not None:
        jsonl.close()
    except OSError as e:
      raise write_error(self._path, e) from None
    finally:
      for tracker in trackers:
        tracker.close(failed)
