"""Diagnostics of the latent Z, computed from one eval batch's encoder logits and codes.

Shape letters: B batch, T tokens, N = B*T, M tokens in the pairwise subset, H bits.

All quantities are in nats per token unless the name says otherwise; the eval step prefixes them
with `eval_z_` (see `ftjax.train.eval_step`):

- `kl_bitHH`: mean over the batch's tokens of KL(Bernoulli(p_h) ‖ Bernoulli(1/2)) for bit h; they
  sum to the mean KL (the bits are independent given the input).
- `active_bits`: how many bits have `kl_bitHH` > ACTIVE_BIT_NATS (0.01 nats) on this batch.
- `mi_bits_bound`: mean KL minus Σ_h KL(Bernoulli(q̄_h) ‖ Bernoulli(1/2)), with q̄_h the mean of
  p_h over the batch's tokens (the per-bit aggregate posterior). It equals Σ_h I(X; B_h) under the
  empirical distribution of the batch's tokens, an UPPER bound on I(X; Z) (H(Z) ≤ Σ_h H(B_h)) and
  a lower bound on the mean KL (mean KL = I(X; Z) + KL(q̄(Z) ‖ uniform)).
- `mi`: a Monte-Carlo estimate of I(X; Z) = E_n E_{z~q_n}[log q_n(z) − log q̄(z)], with the full
  aggregate posterior q̄ = mean_m q_m over M ≤ MI_TOKENS tokens of the batch (evenly strided), one
  sampled code per token. Bounded by log M (≈ 6.93 nats at M = 1024): it measures how well Z tells
  those M tokens apart, so read it against log M.
- `code_ppl`, `code_ppl_argmax`: exp of the plug-in entropy of the sampled codes (resp. the most
  likely code of each token) over the same M tokens: how many distinct codes are in use (≤ M).

X here is "which token of the batch, with its whole sequence": the encoder sees the sequence
non-causally, so I(X; Z) is the information per token that Z carries about the sequence.
"""

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ftjax.data import synthetic

ACTIVE_BIT_NATS = 0.01
MI_TOKENS = 1024
LOG2 = math.log(2)


def block_starts(block_len: int) -> int:
  """Synthetic task: the places where a block of `block_len` can start in the body (57 for the
  default 8 in 64), uniformly in the data."""
  return synthetic.BODY_LEN - block_len + 1


def block_start_chance(block_len: int) -> tuple[float, float]:
  """Synthetic task, two independent block starts over n = `block_starts(block_len)` places:
  (the probability that they coincide, 1/n; their mean distance, (n² − 1) / (3n))."""
  n = block_starts(block_len)
  return 1 / n, (n**2 - 1) / (3 * n)


def bit_kl_NH(logits_NH: jax.Array) -> jax.Array:
  """KL(Bernoulli(sigmoid(l)) ‖ Bernoulli(1/2)) per token and bit, nats."""
  l = logits_NH.astype(jnp.float32)
  log_p, log_q = jax.nn.log_sigmoid(l), jax.nn.log_sigmoid(-l)
  return LOG2 + jnp.exp(log_p) * log_p + jnp.exp(log_q) * log_q


def _bernoulli_kl_to_half(p):
  p = jnp.clip(p, 1e-12, 1 - 1e-12)
  return LOG2 + p * jnp.log(p) + (1 - p) * jnp.log1p(-p)


def _code_entropy(codes_M, w_M):
  """Plug-in entropy (nats) of the codes weighted by w (pairwise equality, M × M)."""
  total = jnp.maximum(jnp.sum(w_M), 1.0)
  count_M = jnp.sum(jnp.where(codes_M[:, None] == codes_M[None, :], w_M[None, :], 0.0), axis=1)
  return -jnp.sum(w_M * jnp.log(jnp.maximum(count_M, 1e-12) / total)) / total


def diagnostics(logits_BTH: jax.Array, codes_BT: jax.Array,
                mask_BT: jax.Array) -> dict[str, jax.Array]:
  """A dict of float32 scalars (see the module docstring) for one batch."""
  h = logits_BTH.shape[-1]
  logits_NH = logits_BTH.reshape(-1, h).astype(jnp.float32)
  w_N = mask_BT.reshape(-1).astype(jnp.float32)
  total = jnp.maximum(jnp.sum(w_N), 1.0)
  kl_H = jnp.sum(bit_kl_NH(logits_NH) * w_N[:, None], axis=0) / total
  out = {f"kl_bit{i:02d}": kl_H[i] for i in range(h)}
  out["active_bits"] = jnp.sum((kl_H > ACTIVE_BIT_NATS).astype(jnp.float32))
  p_mean_H = jnp.sum(jax.nn.sigmoid(logits_NH) * w_N[:, None], axis=0) / total
  out["mi_bits_bound"] = jnp.sum(kl_H) - jnp.sum(_bernoulli_kl_to_half(p_mean_H))

  n = logits_NH.shape[0]
  m = min(n, MI_TOKENS)
  idx = jnp.arange(m) * (n // m)
  l_MH, w_M = logits_NH[idx], w_N[idx]
  codes_M = codes_BT.reshape(-1)[idx]
  bits_MH = ((codes_M[:, None] >> jnp.arange(h, dtype=jnp.int32)) & 1).astype(jnp.float32)
  log_p_MH, log_q_MH = jax.nn.log_sigmoid(l_MH), jax.nn.log_sigmoid(-l_MH)
  # log q_k(z_j) for every pair: row j = the code sampled for token j, column k = token k's posterior
  log_q_MM = bits_MH @ log_p_MH.T + (1 - bits_MH) @ log_q_MH.T
  w_total = jnp.maximum(jnp.sum(w_M), 1.0)
  log_w_M = jnp.log(jnp.maximum(w_M, 1e-30))
  log_agg_M = jax.nn.logsumexp(log_q_MM + log_w_M[None, :], axis=1) - jnp.log(w_total)
  out["mi"] = jnp.sum(w_M * (jnp.diagonal(log_q_MM) - log_agg_M)) / w_total
  out["code_ppl"] = jnp.exp(_code_entropy(codes_M, w_M))
  argmax_M = jnp.sum((l_MH > 0).astype(jnp.int32) << jnp.arange(h, dtype=jnp.int32), axis=-1)
  out["code_ppl_argmax"] = jnp.exp(_code_entropy(argmax_M, w_M))
  return out


def block_start(text: str) -> Optional[int]:
  """Synthetic task: where the prompt letter's block starts in a decoded 'X>body' (None if the
  letter is absent)."""
  body = text[2:]
  return next((i for i, c in enumerate(body) if c == text[0]), None) if len(text) > 2 else None


def shared_z_tests(texts: list[str], groups: list[int], draws: int = 10000,
                   seed: int = 0) -> dict[str, tuple[float, float, float]]:
  """Synthetic task: do samples that share a Z draw agree more than samples that do not?
  {"position": ..., "distance": ..., "noise": ...}, each (within, across, p) of
  `group_permutation_test`. Position: both blocks start at the same place (a sample without its
  letter's block agrees with none); distance: how far apart the two blocks start, over pairs where
  both have one (a Z that encodes only a rough position; within < across, small p); noise: the
  Jaccard overlap of the two samples' '!' positions."""
  import numpy as np
  starts = [block_start(t) for t in texts]
  bangs = [{i for i, c in enumerate(t[2:]) if c == "!"} for t in texts]
  start_N = np.array([np.nan if s is None else s for s in starts], float)
  out = group_permutation_test(
      {"position": [[a is not None and a == b for b in starts] for a in starts],
       "distance": -np.abs(start_N[:, None] - start_N[None, :]),
       "noise": [[len(a & b) / max(len(a | b), 1) for b in bangs] for a in bangs]},
      groups, draws, seed)
  within, across, p = out["distance"]
  out["distance"] = (-within, -across, p)
  return out


def group_permutation_test(agree: dict[str, Any], groups: list[int], draws: int = 10000,
                           seed: int = 0) -> dict[str, tuple[float, float, float]]:
  """For each pairwise agreement matrix (N × N) in `agree`: (within, across, p), the mean
  agreement over pairs in the same group and over pairs in different groups (NaN entries: pairs
  left out), and a one-sided permutation p-value of within − across over the group labels
  shuffled `draws` times (small p: samples of a group agree more than chance)."""
  import numpy as np
  groups = np.asarray(groups)
  rng = np.random.default_rng(seed)
  perms_DN = np.stack([rng.permutation(groups) for _ in range(draws)])
  upper_NN = np.triu(np.ones((len(groups), len(groups)), bool), 1)
  out = {}
  for name, m in agree.items():
    m_NN = np.asarray(m, float)
    kept_NN = upper_NN & ~np.isnan(m_NN)
    m_NN = np.where(kept_NN, m_NN, 0.0)
    (within,), (across,) = _group_rates(groups[None], m_NN, kept_NN)
    null_D = np.concatenate([np.subtract(*_group_rates(perms_DN[i:i + 500], m_NN, kept_NN))
                             for i in range(0, draws, 500)])
    # An undefined shuffled rate counts against the observed one; no defined rate: p = 1.
    p = ((1 + np.sum(~(null_D < within - across - 1e-12))) / (1 + draws)
         if np.isfinite(within - across) else 1.0)
    out[name] = (float(within), float(across), float(p))
  return out


def _group_rates(labels_DN, m_NN, kept_NN):
  """For each of D labellings: the mean of m over the kept pairs in the same group and over those
  in different groups (NaN where there are none); m is 0 outside the kept pairs."""
  import numpy as np
  onehot_DGN = (labels_DN[:, None, :] == np.unique(labels_DN)[None, :, None]).astype(float)

  def same_group_sum(x_NN):
    return ((onehot_DGN @ x_NN) * onehot_DGN).sum((1, 2))
  kept_NN = kept_NN.astype(float)
  sums = same_group_sum(m_NN), m_NN.sum() - same_group_sum(m_NN)
  counts = same_group_sum(kept_NN), kept_NN.sum() - same_group_sum(kept_NN)
  with np.errstate(invalid="ignore", divide="ignore"):
    return tuple(np.where(c > 0, s / np.maximum(c, 1), np.nan) for s, c in zip(sums, counts))


def shared_z_samples(trainer: Any, params: dict, num_z: int = 16, per_z: int = 8,
                     seed: int = 0) -> tuple[list[str], list[int]]:
  """Synthetic task, Free Transformer: (decoded samples, their group labels), `num_z` groups of
  `per_z`, each group with one draw of Z from the prior (a code per position, shared by the
  group; prompt letters differ)."""
  import numpy as np

  from ftjax import sampling
  from ftjax.model import make_model
  lat = trainer.cfg.model.latent
  rng = np.random.default_rng(seed)
  n = num_z * per_z
  letters = rng.integers(0, 26, n)
  prompts = np.stack([synthetic.encode(f"{chr(ord('A') + l)}>") for l in letters])
  length = synthetic.PROMPT_LEN + synthetic.BODY_LEN
  codes = np.repeat(rng.integers(0, 2**lat.num_bits, (num_z, length)), per_z, axis=0)
  out = sampling.generate(make_model(trainer.cfg.model, decode=True), params, jnp.asarray(prompts),
                          jnp.zeros(n, jnp.int32), jax.random.key(seed), z_mode="fixed",
                          max_new_tokens=synthetic.BODY_LEN,
                          fixed_codes_BT=jnp.asarray(codes, jnp.int32))
  texts = [synthetic.decode(row) for row in np.asarray(jax.device_get(out["tokens"]))]
  return texts, [i // per_z for i in range(n)]


def shared_z_lines(texts: list[str], groups: list[int],
                   tests: dict[str, tuple[float, float, float]], block_len: int,
                   show: int = 4) -> list[str]:
  """The samples of the first `show` groups and the results of `shared_z_tests` (over all
  groups) against the chance levels of blocks of `block_len` (data.block_len), as printed
  lines."""
  position_chance, distance_chance = block_start_chance(block_len)
  num_z = max(groups) + 1
  lines = [f"samples sharing a Z draw ({num_z} draws from the prior, {len(texts) // num_z} "
           f"samples each, random prompt letters; the first {min(show, num_z)} draws shown, "
           "the tests over all):"]
  for k in range(min(show, num_z)):
    lines.append(f" Z #{k}")
    lines += ["  " + t for t, g in zip(texts, groups) if g == k]
  within, across, p = tests["position"]
  lines.append(f"same block position: {within:.2f} of pairs sharing a Z, {across:.2f} of pairs "
               f"with different Z (chance ≈ {position_chance:.2f}); permutation p = {p:.4f}")
  within, across, p = tests["distance"]
  lines.append(f"distance between block starts: {within:.1f} for pairs sharing a Z, {across:.1f} "
               f"for pairs with different Z (chance ≈ {distance_chance:.0f}); "
               f"permutation p = {p:.4f}")
  within, across, p = tests["noise"]
  lines.append(f"overlap of the '!' positions (Jaccard): {within:.2f} for pairs sharing a Z, "
               f"{across:.2f} for pairs with different Z; permutation p = {p:.4f}")
  return lines


def shared_z_report(trainer: Any, state: Any, workdir: str) -> list[str]:
  """The synthetic configs' end-of-run hook (train.end_of_run): for a Free Transformer on the
  synthetic task, the lines of `shared_z_samples` and their `shared_z_tests` (the share of pairs
  whose blocks start at the same position, the distance between block starts and the overlap of
  their '!' positions, within groups against across groups, with permutation p-values); none
  otherwise."""
  del workdir
  if trainer.source.name != "synthetic" or not trainer.cfg.model.latent.enabled:
    return []
  texts, groups = shared_z_samples(trainer, state.params)
  return shared_z_lines(texts, groups, shared_z_tests(texts, groups), trainer.cfg.data.block_len)
