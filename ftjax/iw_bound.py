"""An importance-weighted bound on a Free Transformer's log-likelihood (Burda et al., 2016).

Shape letters: B batch, T tokens, H latent bits, K encoder samples per sequence.

With Z a code per token, the uniform prior p(z_t) = 2^-H and the encoder's posterior
q(z | x) = Π_t Π_h Bernoulli(b_th; sigmoid(l_th)), each sample z_k ~ q of a sequence has the log
weight log w_k = log p(x | z_k) + log p(z_k) − log q(z_k | x), summed over the sequence's scored
tokens, and

    IW_K = log (1/K) Σ_k w_k,   log p(x) ≥ E[IW_K] ≥ E[IW_(K-1)] ≥ ... ≥ E[IW_1] = ELBO.

E[IW_K] tends to log p(x) as K grows. A "sequence" here is a batch row: with packed documents
the bound is on the row's log-likelihood (the sum of its documents'); weights per document would
give a tighter one.
"""

import functools
import math

import jax
import jax.numpy as jnp

from ftjax import distributed, latent, sharding, train

LOG2 = math.log(2)


def log_ratio_BT(logits_BTH: jax.Array, codes_BT: jax.Array) -> jax.Array:
  """log q(z_t | x) − log p(z_t) per token: the code's log-probability under the encoder's
  Bernoullis plus H log 2 (minus the uniform prior's log)."""
  h = logits_BTH.shape[-1]
  l_BTH = logits_BTH.astype(jnp.float32)
  bits_BTH = latent.codes_to_bits(codes_BT, h).astype(jnp.float32)
  log_q_BT = jnp.sum(bits_BTH * jax.nn.log_sigmoid(l_BTH)
                     + (1 - bits_BTH) * jax.nn.log_sigmoid(-l_BTH), axis=-1)
  return log_q_BT + h * LOG2


def log_weight_B(model, params, batch: dict, key: jax.Array) -> jax.Array:
  """log w of one encoder sample of Z (drawn with `key`) per row, over the scored tokens."""
  nll_BT, aux = train._nll(model, params, batch, "encoder", key)
  mask_BT = train.token_mask(batch)
  log_ratio = log_ratio_BT(aux["latent_logits_BTH"], aux["codes_BT"])
  return -jnp.sum((nll_BT + log_ratio) * mask_BT, axis=1)


def log_weights_KB(params, batch: dict, key: jax.Array, *, model, num_samples: int) -> jax.Array:
  """log w of `num_samples` independent encoder samples per row, sample k drawn with
  jax.random.split(key, num_samples)[k]; one forward pass each, in sequence (lax.map)."""
  keys = jax.random.split(key, num_samples)
  return jax.lax.map(lambda k: log_weight_B(model, params, batch, k), keys)


def iw_bound_B(log_w_KB: jax.Array, k: int) -> jax.Array:
  """IW_k per row from the first k samples: log-mean-exp of their log weights (nats)."""
  return jax.nn.logsumexp(log_w_KB[:k], axis=0) - math.log(k)


def _batch_sums(params, batch, key, *, model, num_samples, ks):
  """Per batch: −Σ_rows IW_k for each k in `ks`, the scored tokens and their bytes."""
  log_w_KB = log_weights_KB(params, batch, key, model=model, num_samples=num_samples)
  mask_BT = train.token_mask(batch)
  out = {f"iw{k}_nats": -jnp.sum(iw_bound_B(log_w_KB, k)) for k in ks}
  out["tokens"] = jnp.sum(mask_BT)
  if "target_bytes" in batch:
    out["bytes"] = jnp.sum(jnp.where(mask_BT > 0, batch["target_bytes"], 0))
  return out


def evaluate(trainer, params, num_samples: int = 16, num_batches=None, key=None,
             ks=(1, 4, 16)) -> dict:
  """IW_k for each k in `ks` (≤ num_samples) over the first `num_batches` (default
  `train.eval_batches`) validation batches, the batches `Trainer.evaluate` scores: nats per
  token (`iw{k}_nats`) and, for text with `target_bytes`, bits per byte (`iw{k}_bpb`). The
  samples come from fixed keys (`key`, default key(seed + 2), folded with the batch index)."""
  cfg = trainer.cfg
  key = jax.random.key(cfg.seed + 2) if key is None else key
  step = jax.jit(functools.partial(_batch_sums, model=trainer.model, num_samples=num_samples,
                                   ks=ks))
  stream = trainer.stream("validation")
  rows = []
  try:
    for i in range(num_batches or cfg.train.eval_batches):
      with sharding.in_mesh(trainer.mesh):
        rows.append(step(params, trainer.to_global(next(stream)), jax.random.fold_in(key, i)))
  finally:
    stream.close()
  totals = {name: sum(float(r[name]) for r in distributed.fetch(rows)) for name in rows[0]}
  out = {"iw_samples": num_samples, "eval_batches": len(rows), "tokens": int(totals["tokens"])}
  for k in ks:
    out[f"iw{k}_nats"] = totals[f"iw{k}_nats"] / max(totals["tokens"], 1.0)
    if "bytes" in totals:
      out[f"iw{k}_bpb"] = totals[f"iw{k}_nats"] / (LOG2 * max(totals["bytes"], 1.0))
  if "bytes" in totals:
    out["bytes"] = int(totals["bytes"])
  return out
