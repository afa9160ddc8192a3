"""An lm-evaluation-harness model for ftjax runs (registered as "ftjax").

    lm_eval.simple_evaluate(model=FtjaxLM(workdir=RUN, z_mode="uniform"), tasks=[...])

or `python -m launch.lm_eval --workdir=RUN --tasks=...`. Implements `loglikelihood`,
`loglikelihood_rolling` and `generate_until` (the KV-cache `ftjax.sampling.generate`), batched:
rows are padded to `batch_size` and lengths to multiples of 64, so that a task compiles a few
shapes only.

How a Free Transformer's Z is chosen (`z_mode`):
  "uniform" (default, as in the paper's evaluation): a code drawn uniformly per token. The draw
      of request i uses fold_in(key(seed), i) over the request's own positions, so a score does
      not depend on how requests are batched;
  "fixed": one code for every position of a request (`code`, else drawn per request);
  "encoder": the context's codes come from the encoder run over the context only (a prefill
      with the KV cache), the continuation's (or generated tokens') codes are uniform, so the
      encoder never sees what is scored.
A baseline run ignores `z_mode`.

Tokenizer: the run's Hugging Face tokenizer (`RUN/hf_tokenizer/tokenizer.json`, from
`launch.import_hf`) when it has one, else the run's data tokenizer (bytes, sentencepiece). With
lm_eval's apply_chat_template, prompts are written in the checkpoint's chat template
(ftjax.chat_template; a run without an HF tokenizer has none).
"""

import functools
from typing import Any, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import lm_eval.models  # noqa: F401  (lm_eval's own models, registered lazily: "hf" etc. stay
from lm_eval.api.model import TemplateLM  # resolvable once "ftjax" is in the registry)
from lm_eval.api.registry import register_model

from ftjax import chat_template as chat_template_lib, hf, latent as latent_lib, sampling
from ftjax.errors import ChatTemplateError
from ftjax.model import make_model

LENGTH_BUCKET = 64


def _bucket(n: int, limit: int) -> int:
  return min(-(-n // LENGTH_BUCKET) * LENGTH_BUCKET, limit)


def _as_bool(value: Any) -> bool:
  return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def _row_codes(key: jax.Array, indices_B: jax.Array, start_B: jax.Array, length: int,
               num_bits: int, z_mode: str, code: Optional[int], code_len: int) -> jax.Array:
  """(B, length) codes: uniform per position or one per row, drawn from each request's own
  key (fold_in(key, index)) over `code_len` positions and aligned to its first real token
  (`start_B`), so that batching and padding do not change them."""

  def row(index, start):
    row_key = jax.random.fold_in(key, index)
    if z_mode == "fixed":
      value = (jnp.int32(code) if code is not None else
               latent_lib.uniform_codes(row_key, (), num_bits))
      return jnp.full((length,), value, jnp.int32)
    own = latent_lib.uniform_codes(row_key, (code_len,), num_bits)
    return jnp.take(own, jnp.clip(jnp.arange(length) - start, 0, code_len - 1))
  return jax.vmap(row)(indices_B, start_B)


def _token_scores(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
  logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1)[..., 0]
  return logp_BT, jnp.argmax(logits_BTV, -1) == targets_BT


@functools.partial(jax.jit, static_argnames=("model", "z_mode", "code", "code_len"))
def score_full(model: Any, params: Any, tokens_BT: jax.Array, start_B: jax.Array,
               indices_B: jax.Array, key: jax.Array, *, z_mode: str, code: Optional[int],
               code_len: int) -> tuple[jax.Array, jax.Array]:
  """Per-token log-probabilities of tokens_BT[:, 1:] (left-padded rows) and whether each was
  the argmax, with Z given (uniform or fixed) at every position."""
  lat = model.cfg.latent
  mode, kwargs = "zero", {}
  if lat.enabled:
    mode, kwargs = "given", {"codes_BT": _row_codes(key, indices_B, start_B, tokens_BT.shape[1],
                                                    lat.num_bits, z_mode, code, code_len)}
  logits_BTV, _ = model.apply({"params": params}, tokens_BT, start_B=start_B, z_mode=mode,
                              **kwargs)
  return _token_scores(logits_BTV[:, :-1], tokens_BT[:, 1:])


@functools.partial(jax.jit, static_argnames=("decode_model", "code_len"))
def score_encoder(decode_model: Any, params: Any, context_BP: jax.Array, start_B: jax.Array,
                  cont_BC: jax.Array, indices_B: jax.Array, key: jax.Array,
                  encoder_key: jax.Array, *, code_len: int) -> tuple[jax.Array, jax.Array]:
  """Z of the (left-padded) context from the encoder over the context alone, in a cached
  prefill; then the (right-padded) continuation in one cached call with uniform Z."""
  from ftjax import sampling as sampling_lib
  b, p = context_BP.shape
  c = cont_BC.shape[1]
  lat = decode_model.cfg.latent
  cache = sampling_lib.empty_cache(decode_model, b, p + c)
  codes_BT = _row_codes(key, indices_B, start_B, p + c, lat.num_bits, "uniform", None, code_len)
  (prefill_BPV, _), mutated = decode_model.apply(
      {"params": params, "cache": cache}, context_BP, z_mode="encoder",
      latent_key=jax.random.fold_in(encoder_key, indices_B[0]), start_B=start_B,
      mutable=["cache"])
  (cont_BCV, _), _ = decode_model.apply(
      {"params": params, "cache": mutated["cache"]}, cont_BC, z_mode="given",
      codes_BT=codes_BT[:, p:], start_B=start_B, mutable=["cache"])
  logits_BCV = jnp.concatenate([prefill_BPV[:, -1:], cont_BCV[:, :-1]], axis=1)
  return _token_scores(logits_BCV, cont_BC)


@register_model("ftjax")
class FtjaxLM(TemplateLM):
  """lm_eval model arguments: workdir (required), step, z_mode, code, seed, batch_size,
  max_length (default: the imported checkpoint's max_position_embeddings, else model.seq_len),
  add_bos_token (prepend BOS to every context; default false, as lm_eval's `hf` model)."""

  def __init__(self, workdir: str, step: Optional[int] = None, z_mode: str = "uniform",
               code: Optional[int] = None, seed: int = 0, batch_size: int = 8,
               max_length: Optional[int] = None, add_bos_token: Union[bool, str] = False,
               restored: Any = None, params: Any = None) -> None:
    super().__init__()
    if z_mode not in sampling.GENERATION_Z_MODES:
      raise ValueError(f"z_mode must be one of {sampling.GENERATION_Z_MODES}, got {z_mode!r}")
    if restored is None:  # parameters and tokenizer only: no optimizer, no data source
      from ftjax import run
      restored = run.load_for_inference(workdir, None if step is None else int(step))
    self.text, self.cfg = restored.text, restored.cfg
    self.params = restored.params if params is None else params
    self.model = make_model(self.cfg.model)
    self.decode_model = make_model(self.cfg.model, decode=True)
    self.latent = self.cfg.model.latent
    self.z_mode = z_mode if self.latent.enabled else "uniform"
    self.code = None if code is None else int(code)
    if self.code is not None and z_mode != "fixed":
      raise ValueError(f"code is for z_mode='fixed', got z_mode={z_mode!r}")
    if self.code is not None and not 0 <= self.code < 2**self.latent.num_bits:
      raise ValueError(f"code must be in 0..{2**self.latent.num_bits - 1}, got {self.code}")
    self.key, self.encoder_key = jax.random.split(jax.random.key(int(seed)))
    self.batch_size_per_gpu = int(batch_size) if str(batch_size) != "auto" else 8
    self.add_bos_token = _as_bool(add_bos_token)
    self.hf_tokenizer = hf.run_tokenizer(workdir)
    self._chat_template_name = None  # lm_eval's choice, set by chat_template()
    tok = self.text.tokenizer
    if self.hf_tokenizer is not None:
      self._eot = self.hf_tokenizer.eos_id
      self._bos = self.hf_tokenizer.bos_id
    else:
      self._eot = getattr(tok, "eos_id", 2)
      self._bos = getattr(tok, "bos_id", None)
    if self._eot is None:
      self._eot = self._bos if self._bos is not None else 0
    self.max_length = int(max_length) if max_length else self._default_max_length(workdir)

  def _default_max_length(self, workdir: str) -> int:
    positions = hf.saved_hf_config(workdir).get("max_position_embeddings")
    if positions:
      return int(positions)
    return int(self.cfg.model.seq_len)

  # -------------------------------------------------------------------- tokenizer

  @property
  def eot_token_id(self) -> int:
    return self._eot

  @property
  def prefix_token_id(self) -> int:
    return self._bos if self._bos is not None else self._eot

  @property
  def tokenizer_name(self) -> str:
    return "ftjax-" + ("hf" if self.hf_tokenizer is not None else self.cfg.data.tokenizer)

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                 **kwargs: Any) -> list[int]:
    del kwargs
    if self.hf_tokenizer is not None:
      ids = list(self.hf_tokenizer.encode(string))
    else:
      ids = [int(t) for t in np.asarray(self.text.encode(string, False)).tolist()]
    if self.add_bos_token and add_special_tokens is not False and self._bos is not None:
      ids = [self._bos] + ids
    return ids

  def tok_decode(self, tokens: Sequence[int]) -> str:
    if self.hf_tokenizer is not None:
      return self.hf_tokenizer.decode(tokens)
    return self.text.decode(np.asarray(tokens, np.int32))

  # -------------------------------------------------------------------- chat templates

  def chat_template(self, chat_template: Union[bool, str] = False) -> Optional[str]:
    """lm_eval (--apply_chat_template[=NAME]): the checkpoint's chat template to use (True:
    the default one; a string: the one of that name); None when off."""
    if chat_template is False or chat_template is None:
      return None
    if self.hf_tokenizer is None:
      raise ChatTemplateError("this run has no Hugging Face tokenizer, so no chat template")
    self._chat_template_name = None if chat_template is True else str(chat_template)
    return chat_template_lib.pick(self.hf_tokenizer.chat_templates, self._chat_template_name)

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The few-shot conversation as text in the chat template; without a generation prompt
    the final (assistant) message is continued. A template that rejects the system role gets
    the conversation without it (as lm_eval's `hf` model does)."""
    if self.hf_tokenizer is None:
      raise ChatTemplateError("this run has no Hugging Face tokenizer, so no chat template")
    def render(messages):
      return self.hf_tokenizer.apply_chat_template(
          messages, add_generation_prompt, continue_final_message=not add_generation_prompt,
          name=self._chat_template_name)
    try:
      return render(chat_history)
    except ChatTemplateError:
      if not any(m["role"] == "system" for m in chat_history):
        raise
      return render([m for m in chat_history if m["role"] != "system"])

  # -------------------------------------------------------------------- scoring

  def _batches(self, n: int, order: list[int]) -> Iterator[list[int]]:
    size = self.batch_size_per_gpu
    for i in range(0, n, size):
      yield order[i:i + size]

  def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                            **kwargs: Any) -> list[tuple[float, bool]]:
    """[(logprob, is_greedy)] of each (key, context ids, continuation ids); contexts are cut
    on the left to fit max_length."""
    del disable_tqdm, kwargs
    pairs = []
    for _, context, continuation in requests:
      if not continuation:
        raise ValueError("an empty continuation cannot be scored")
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      n_ctx = len(whole) - len(continuation)
      if n_ctx < 1:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit "
                         f"max_length={self.max_length}")
      pairs.append((whole[:n_ctx], whole[n_ctx:]))
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    results = [None] * len(pairs)
    for rows in self._batches(len(pairs), order):
      for i, value in zip(rows, self._score_rows([pairs[i] for i in rows], rows)):
        results[i] = value
        if self.cache_hook is not None:
          self.cache_hook.add_partial("loglikelihood", requests[i][0], value)
    return results

  def _score_rows(self, pairs: list[tuple[list[int], list[int]]],
                  indices: list[int]) -> list[tuple[float, bool]]:
    size = self.batch_size_per_gpu
    padded = pairs + [pairs[-1]] * (size - len(pairs))  # a fixed batch shape
    index_B = jnp.asarray(list(indices) + [indices[-1]] * (size - len(pairs)), jnp.int32)
    out = []
    if self.z_mode == "encoder":
      context_BP, start_B = sampling.left_pad(
          [c for c, _ in padded], length=_bucket(max(len(c) for c, _ in padded), self.max_length))
      width = _bucket(max(len(x) for _, x in padded), self.max_length)
      cont_BC = np.zeros((size, width), np.int32)
      for r, (_, x) in enumerate(padded):
        cont_BC[r, :len(x)] = x
      logp_BC, greedy_BC = jax.device_get(score_encoder(
          self.decode_model, self.params, jnp.asarray(context_BP), jnp.asarray(start_B),
          jnp.asarray(cont_BC), index_B, self.key, self.encoder_key,
          code_len=self.max_length + 1))
      for r, (_, x) in enumerate(pairs):
        out.append((float(logp_BC[r, :len(x)].sum()), bool(greedy_BC[r, :len(x)].all())))
      return out
    tokens_BT, start_B = sampling.left_pad(
        [c + x for c, x in padded],
        length=_bucket(max(len(c) + len(x) for c, x in padded), self.max_length + 1))
    logp_BT, greedy_BT = jax.device_get(score_full(
        self.model, self.params, jnp.asarray(tokens_BT), jnp.asarray(start_B), index_B,
        self.key, z_mode=self.z_mode, code=self.code, code_len=self.max_length + 1))
    for r, (_, x) in enumerate(pairs):
      out.append((float(logp_BT[r, -len(x):].sum()), bool(greedy_BT[r, -len(x):].all())))
    return out

  def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
    """Summed log-likelihood of each whole string, in windows of max_length tokens (each
    window conditioned on the tokens before it, the first on the prefix token)."""
    from lm_eval import utils
    windows, owner = [], []
    for n, (string,) in enumerate([req.args for req in requests]):
      pieces = utils.get_rolling_token_windows(
          token_list=self.tok_encode(string, add_special_tokens=False),
          prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)
      for context, continuation in map(utils.make_disjoint_window, pieces):
        windows.append(((string, None), context, continuation))
        owner.append(n)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
    totals = [0.0] * len(requests)
    for n, (logp, _) in zip(owner, scores):
      totals[n] += logp
    for req, total in zip(requests, totals):
      if self.cache_hook is not None:
        self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # -------------------------------------------------------------------- generation

  def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
    """Samples (greedy unless do_sample with temperature > 0) up to max_gen_toks tokens per
    context with the KV cache, cut at the first `until` string or the end-of-text token."""
    del disable_tqdm
    results = [None] * len(requests)
    groups = {}
    for i, req in enumerate(requests):
      context, gen_kwargs = req.args
      kwargs = dict(gen_kwargs or {})
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop("max_gen_toks", 256))
      do_sample = _as_bool(kwargs.pop("do_sample", False))
      temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
      top_p = float(kwargs.pop("top_p", 1.0) or 1.0) if do_sample else 1.0
      top_k = int(kwargs.pop("top_k", 0) or 0) if do_sample else 0
      group = (tuple(until), max_new, temperature, top_p, top_k)
      groups.setdefault(group, []).append((i, context))
    size = self.batch_size_per_gpu
    for (until, max_new, temperature, top_p, top_k), items in groups.items():
      for b in range(0, len(items), size):
        batch = items[b:b + size]
        prompts = [self.tok_encode(c) or [self.prefix_token_id] for _, c in batch]
        tokens = self.generate_tokens(prompts, max_new, temperature, top_k, top_p,
                                      jax.random.fold_in(self.key, batch[0][0]))
        for r, (i, context) in enumerate(batch):
          text = self.tok_decode(tokens[r])
          for stop in until:
            if stop and stop in text:
              text = text[:text.index(stop)]
          results[i] = text
          if self.cache_hook is not None:
            self.cache_hook.add_partial("generate_until", (context, requests[i].args[1]), text)
    return results

  def generate_tokens(self, prompts: list[Sequence[int]], max_new: int, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0,
                      key: Optional[jax.Array] = None) -> list[list[int]]:
    """New token ids (lists, cut before the end-of-text token) after each prompt (id lists,
    at most batch_size of them), with the KV cache."""
    size = self.batch_size_per_gpu
    n = len(prompts)
    prompts = prompts + [prompts[-1]] * (size - n)
    budget = max(self.max_length - max_new, 1)
    prompts = [list(x)[-budget:] for x in prompts]
    p = _bucket(max(len(x) for x in prompts), budget)
    prompt_BP, start_B = sampling.left_pad(prompts, length=p)
    out = sampling.generate(
        self.decode_model, self.params, jnp.asarray(prompt_BP), jnp.asarray(start_B),
        self.key if key is None else key, max_new_tokens=max_new, z_mode=self.z_mode,
        codes_B=None if self.code is None else jnp.full((size,), self.code, jnp.int32),
        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=self.eot_token_id)
    rows = []
    for row in np.asarray(out["tokens"])[:n, p:].tolist():
      rows.append(row[:row.index(self.eot_token_id)] if self.eot_token_id in row else row)
    return rows
