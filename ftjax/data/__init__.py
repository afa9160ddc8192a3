"""Data sources: `make_source(cfg)` gives streams of {'inputs', 'targets', ...} batches.

A stream yields this process's rows of each global batch and has `get_state()`/`set_state()`
(a JSON-able dict saved with the checkpoints), so a resumed run reads exactly the batches that
would have come next. Two kinds:
  in memory (the synthetic task; text crops with `data.loader="memory"`): batch s is a pure
      function of (seed, split, s); the state is the step;
  grain (`data.loader="grain"`, and `data.name="prepared"`): tfds array_record corpora, or
      corpora tokenised by `launch.prepare_data` (`ftjax.data.prepared`; several mixed by weight
      with `data.mixture`), shuffled, packed and batched by `ftjax.data.pipeline`; the state is
      grain's iterator state. Their batches also carry `segment_ids`, `positions` and
      `target_bytes` (see `ftjax.data.pipeline`).
"""

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from ftjax.data import synthetic, text
from ftjax.data.mixture import parse_mixture
from ftjax.errors import ConfigError, TokenizerError


class StepStream:
  """Batches of a step-keyed source: `make_tokens(step, batch_size, split, rows)`."""

  def __init__(self, make_tokens, batch_size, split, rows):
    self._make_tokens, self._batch_size, self._split, self._rows = (
        make_tokens, batch_size, split, rows)
    self.step = 0

  def __next__(self):
    tokens = self._make_tokens(self.step, self._batch_size, self._split, self._rows)
    self.step += 1
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])

  def close(self) -> None:
    pass


class GrainStream:
  """Batches of the grain pipeline (`ftjax.data.pipeline.BATCH_KEYS`)."""

  def __init__(self, iterator):
    self._iterator = iterator

  def __next__(self):
    return next(self._iterator)

  def get_state(self) -> Any:
    return self._iterator.get_state()

  def set_state(self, state: Any) -> None:
    self._iterator.set_state(state)

  def close(self) -> None:
    """Stops grain's worker processes (if any)."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


@dataclasses.dataclass(frozen=True)
class Source:
  """Where batches come from, how text maps to tokens, and what a prompt looks like."""
  name: str
  # (split, global batch size, this process's rows, process index, process count) -> stream
  stream: Callable[[str, int, slice, int, int], Any]
  prompts: Callable[[int], np.ndarray]  # n -> (n, P) prompts for samples
  decode: Callable[[np.ndarray], str]
  encode: Callable[[str, bool], np.ndarray]  # (text, starts a sequence) -> tokens
  bytes_per_token: float  # for bits-per-byte; 0 when the data is not text
  tokenizer: Any = None  # text sources: the tokenizer (saved with the run)
  validation_tokens: Optional[int] = None  # where the validation split is finite: its tokens


@dataclasses.dataclass(frozen=True)
class Text:
  """How a run's token ids map to text and back, known without its data."""
  encode: Callable[[str, bool], np.ndarray]  # (text, starts a sequence) -> tokens
  decode: Callable[[np.ndarray], str]
  tokenizer: Any = None  # text runs: the tokenizer

  @classmethod
  def of(cls, tokenizer: Any) -> "Text":
    """A text tokenizer's codec (a sequence's start adds nothing: no BOS)."""
    return cls(lambda string, start=True: tokenizer.encode(string), tokenizer.decode, tokenizer)


SYNTHETIC_TEXT = Text(lambda string, start=True: synthetic.encode(string, bos=start),
                      synthetic.decode)


def run_text(cfg: Any, run_dir: str) -> Text:
  """The text codec of the run in `run_dir` (config `cfg`), from the run's own copy of its
  tokenizer: the training data is not opened (it may be gone)."""
  d = cfg.data
  if d.name == "synthetic":
    return SYNTHETIC_TEXT
  from ftjax.data import tokenizers
  if d.name == "prepared":  # a file tokenizer is copied into the run; none means bytes
    saved = tokenizers.run_copy(run_dir)
    tokenizer = tokenizers.load(saved) if saved else tokenizers.ByteTokenizer()
  else:
    tokenizer = tokenizers.make_tokenizer(cfg, run_dir)
  return Text.of(tokenizer)


def _step_keyed(make_tokens):
  return lambda split, batch_size, rows, *_: StepStream(make_tokens, batch_size, split, rows)


def make_source(cfg: Any, run_dir: Optional[str] = None) -> Source:
  """The data source named by `cfg.data.name`, seeded by `cfg.seed`; a text source uses the
  tokenizer saved in `run_dir` when there is one."""
  d = cfg.data
  if d.name == "synthetic":
    def make_tokens(step, batch_size, split, rows):  # cheap: made whole, then sliced
      return synthetic.generate(cfg.seed, step, batch_size, block_len=d.block_len,
                                noise_prob=d.noise_prob, split=split)[0][rows]

    def prompts(n):  # BOS, letter, '>' for letters spread over the alphabet
      letters = (np.arange(n) * 7) % 26
      return np.stack([np.full(n, synthetic.BOS), synthetic.FIRST_LETTER + letters,
                       np.full(n, synthetic.ARROW)], axis=1).astype(np.int32)
    return Source("synthetic", _step_keyed(make_tokens), prompts, SYNTHETIC_TEXT.decode,
                  SYNTHETIC_TEXT.encode, 0.0)

  if d.name == "prepared":
    return _prepared_source(cfg, run_dir)
  from ftjax.data import tokenizers
  tokenizer = tokenizers.make_tokenizer(cfg, run_dir)
  bytes_per_token = 1.0
  if d.loader == "grain":
    stream = _grain_stream(cfg, tokenizer)
    if tokenizer.name != "bytes":
      bytes_per_token = _bytes_per_token(cfg, tokenizer)
  else:
    corpus = text.load_corpus(d.name, d.eval_fraction)
    stream = _step_keyed(lambda step, batch_size, split, rows: text.generate(
        corpus[split], cfg.seed, step, batch_size, cfg.model.seq_len + 1, split, rows))

  def prompts(n):  # the first 16 tokens of held-out sequences
    return next(stream("validation", n, slice(None), 0, 1))["inputs"][:, :16]
  codec = Text.of(tokenizer)
  return Source(d.name, stream, prompts, codec.decode, codec.encode, bytes_per_token, tokenizer)


def _bytes_per_token(cfg, tokenizer, documents=500):
  """UTF-8 bytes per token on the first held-out documents (end-of-document tokens not
  counted): informational; bits per byte come from the batches' `target_bytes`."""
  from ftjax.data import corpora
  source = corpora.data_source(cfg.data.name, "validation", cfg.data.data_dir)
  docs = [source[i]["text"] for i in range(min(documents, len(source)))]
  tokens = sum(len(tokenizer.encode(doc.decode("utf-8", errors="replace"))) for doc in docs)
  return sum(len(doc) for doc in docs) / max(tokens, 1)


class _DocumentArrays:
  """example -> {'tokens', 'nbytes'} of a text example (a picklable callable for grain)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, example):
    from ftjax.data import tokenizers
    ids, nbytes = tokenizers.document_arrays(self.tokenizer, example["text"])
    return {"tokens": ids, "nbytes": nbytes}


def _grain_stream(cfg, tokenizer):
  from ftjax.data import corpora, pipeline  # tfds and grain load only when used
  d = cfg.data

  def stream(split, batch_size, rows, process_index, process_count):
    local = len(range(*rows.indices(batch_size)))
    source = corpora.data_source(d.name, split, d.data_dir)
    return GrainStream(pipeline.batches(
        source, _DocumentArrays(tokenizer), seed=cfg.seed, seq_len=cfg.model.seq_len,
        batch_size=local, shard_index=process_index, shard_count=process_count,
        worker_count=d.worker_count if split == "train" else 0))
  return stream


def _prepared_tokenizer(cfg, components, run_dir):
  """The tokenizer of prepared data, checked against data.tokenizer and the run's own copy."""
  from ftjax.data import prepared, tokenizers
  (path, meta), *others = components
  ident = meta["tokenizer"]
  for other_path, other in others:
    if other["tokenizer"]["sha256"] != ident["sha256"]:
      raise ConfigError("data.mixture", f"{other_path} was prepared with another tokenizer "
                        f"({other['tokenizer']['kind']}) than {path} ({ident['kind']})")
  want = cfg.data.tokenizer
  if want != "auto":
    try:
      given = tokenizers.load(want, prepared._eos_token(ident))
    except TokenizerError as e:
      raise ConfigError("data.tokenizer", str(e)) from e
    if given.sha256 != ident["sha256"]:
      raise ConfigError("data.tokenizer", f"{want!r} is not the tokenizer {path} was prepared "
                        f"with ({ident['kind']}, sha256 {ident['sha256'][:12]}); set "
                        "data.tokenizer='auto' to use the data's")
  saved = tokenizers.run_copy(run_dir)
  if saved:
    tok = tokenizers.load(saved, prepared._eos_token(ident))
    if tok.sha256 != ident["sha256"]:
      raise ConfigError("data.path", f"the run in {run_dir} was trained with another tokenizer "
                        f"than {path} was prepared with")
    return tok
  return prepared.tokenizer_of(path, meta)


def _prepared_source(cfg, run_dir):
  """Documents of one or more directories made by `launch.prepare_data`, packed by grain."""
  from ftjax.data import pipeline, prepared
  d = cfg.data
  mixture = parse_mixture(d.mixture) if d.mixture else [(d.path, 1.0)] if d.path else []
  if not mixture:
    raise ConfigError("data.path", "no prepared data: set data.path (or data.mixture) to a "
                      f"directory made by `{prepared.PREPARE_COMMAND}`")
  components = [(path, prepared.load_metadata(path)) for path, _ in mixture]
  tokenizer = _prepared_tokenizer(cfg, components, run_dir)
  vocab = components[0][1]["tokenizer"]["vocab_size"]
  if cfg.model.vocab_size < vocab:
    raise ConfigError("model.vocab_size", f"the tokenizer of {components[0][0]} has {vocab:,} "
                      f"ids, more than model.vocab_size={cfg.model.vocab_size:,}")
  weights = [w for _, w in mixture]

  def stream(split, batch_size, rows, process_index, process_count):
    local = len(range(*rows.indices(batch_size)))
    docs = [pipeline.documents(prepared.ShardSource(path, split, meta), _identity,
                               seed=cfg.seed + i, shard_index=process_index,
                               shard_count=process_count)
            for i, (path, meta) in enumerate(components)]
    return GrainStream(pipeline.pack_and_batch(
        pipeline.mix(docs, weights), seq_len=cfg.model.seq_len, batch_size=local,
        worker_count=d.worker_count if split == "train" else 0))

  def prompts(n):  # the first 16 tokens of held-out rows
    return next(stream("validation", n, slice(None), 0, 1))["inputs"][:, :16]
  val = [meta["splits"]["validation"] for _, meta in components]
  bytes_per_token = sum(s["bytes"] for s in val) / max(sum(s["tokens"] for s in val), 1)
  codec = Text.of(tokenizer)
  return Source("prepared", stream, prompts, codec.decode, codec.encode, bytes_per_token,
                tokenizer, validation_tokens=sum(s["tokens"] for s in val))


def _identity(example):
  return example
