"""Held-out evaluation beyond the loss: summed log-likelihoods of continuations
(`sequence_logliks`) and multiple-choice questions scored by them (`read_choices`,
`multiple_choice`). The synthetic task's metric, the share of well-formed samples, is
`ftjax.data.synthetic.well_formed` (launch.evaluate --generate).

Shape letters: B batch, T tokens, V vocabulary.
"""

import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import latent as latent_lib, sampling


def sequence_logliks(model: Any, params: dict, contexts: list, continuations: list,
                     key: jax.Array, z_mode: str = "uniform") -> list[float]:
  """Summed log-likelihood of each continuation given its context (token lists).

  For a Free Transformer, Z is drawn uniformly per token (`z_mode="uniform"`, what generation
  sees) or from the encoder (`"encoder"`, which sees the continuation: not a fair score).
  """
  seqs = [list(c) + list(x) for c, x in zip(contexts, continuations)]
  tokens_BT, start_B = sampling.left_pad(seqs)
  tokens_BT, start_B = jnp.asarray(tokens_BT), jnp.asarray(start_B)
  lat = model.cfg.latent
  mode, kwargs = "zero", {}
  if lat.enabled and z_mode == "encoder":
    mode, kwargs = "encoder", {"latent_key": key}
  elif lat.enabled:
    mode, kwargs = "given", {"codes_BT": latent_lib.uniform_codes(key, tokens_BT.shape,
                                                                  lat.num_bits)}

  @jax.jit
  def token_logliks(params, tokens_BT, start_B, kwargs):
    logits_BTV, _ = model.apply({"params": params}, tokens_BT, start_B=start_B, z_mode=mode,
                                **kwargs)
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32))
    return jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], -1)[..., 0]

  token_logp_BT = np.asarray(token_logliks(params, tokens_BT, start_B, kwargs))
  t = tokens_BT.shape[1]
  # The continuation of row i is its last len(x) tokens, predicted from positions t-1-len(x)...
  return [float(token_logp_BT[i, t - 1 - len(x):].sum()) for i, x in enumerate(continuations)]


def read_choices(path: str) -> list[dict]:
  """Questions from a JSON-lines file: {"question": str, "choices": [str], "answer": int}."""
  items = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        item = json.loads(line)
        ok = (isinstance(item["question"], str) and isinstance(item["choices"], list) and
              len(item["choices"]) >= 2 and 0 <= int(item["answer"]) < len(item["choices"]))
      except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        ok = False
      if not ok:
        raise ValueError(f"{path}:{n}: expected {{\"question\": str, \"choices\": [str, ...], "
                         f"\"answer\": index}}")
      items.append(item)
  return items


def multiple_choice(model: Any, params: dict, encode: Callable, items: list,
                    key: jax.Array) -> tuple[float, list[int]]:
  """Picks, per question, the choice with the highest summed log-likelihood; returns
  (accuracy, predictions)."""
  contexts, continuations, owner = [], [], []
  for q, item in enumerate(items):
    for choice in item["choices"]:
      contexts.append(encode(item["question"], True))
      continuations.append(encode(choice, False))
      owner.append(q)
  scores = sequence_logliks(model, params, contexts, continuations, key)
  predictions = []
  for q in range(len(items)):
    predictions.append(int(np.argmax([s for s, o in zip(scores, owner) if o == q])))
  accuracy = float(np.mean([p == int(it["answer"]) for p, it in zip(predictions, items)]))
  return accuracy, predictions
