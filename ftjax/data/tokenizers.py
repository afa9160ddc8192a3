"""Tokenizers for text: bytes, sentencepiece, or a Hugging Face `tokenizers` file.

  `bytes`: UTF-8 bytes shifted past ftjax's special ids 0, 1, 2 (padding, BOS, end of document);
  sentencepiece: a `.model` file (ftjax trains one per corpus for the built-in corpora, with the
      same special ids, about ten seconds for Shakespeare);
  Hugging Face: a `tokenizer.json` (or a directory holding one), read with the `tokenizers`
      library; the end-of-document id comes from `eos_token`, the directory's
      `tokenizer_config.json`, or a known special token (`</s>`, `<|end_of_text|>`, ...).

A run keeps a copy of its tokenizer file (`RUN_FILES`), so that sampling from the run restores
exactly the tokenizer it was trained with.

Bytes per token (for exact bits per byte): `document_arrays(tok, text)` gives a document's ids
followed by the end-of-document id, and the UTF-8 bytes each id decodes to. A token's bytes come
from a per-id table (`token_bytes`): byte tokens, sentencepiece byte-fallback pieces (`<0xNN>`)
and byte-level BPE tokens count 1 byte per byte they stand for, `▁` counts as a space, special
and control ids (end of document included) count 0. The table cannot see what the decoder does
at a document's edges (sentencepiece drops the `▁` it prepends to a document), so the first
tokens of each document absorb the difference: the bytes of a document's tokens add up to
`len(tok.decode(ids).encode())`, the UTF-8 bytes the document decodes to (after the tokenizer's
normalisation, e.g. sentencepiece's whitespace folding).
"""

import hashlib
import io
import json
import os
import re
import shutil
from typing import Any, Iterable, Optional

import numpy as np

from ftjax.data import text
from ftjax.errors import TokenizerError

RUN_FILE = "tokenizer.model"  # a run's copy of its sentencepiece model
HF_FILE = "tokenizer.json"  # a run's (or a prepared directory's) copy of a Hugging Face tokenizer
RUN_FILES = {"sentencepiece": RUN_FILE, "hf": HF_FILE}
# End-of-document tokens looked for in a Hugging Face tokenizer without tokenizer_config.json.
HF_EOS_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[EOS]",
                     "<|im_end|>")
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _file_sha256(path):
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


class ByteTokenizer:
  name = "bytes"
  vocab_size = text.VOCAB_SIZE
  path = None
  eos_id, bos_id, pad_id = text.EOS, text.BOS, text.PAD
  sha256 = hashlib.sha256(b"ftjax bytes tokenizer: ids 0-2 special, byte b is b + 3").hexdigest()

  def encode(self, string: str) -> np.ndarray:
    return text.encode(string)

  def decode(self, tokens: Any) -> str:
    return text.decode(tokens)

  def special_ids(self) -> dict[str, int]:
    return {"pad": text.PAD, "bos": text.BOS, "eos": text.EOS}

  @property
  def token_bytes(self) -> np.ndarray:
    table = np.zeros(self.vocab_size, np.int32)
    table[text.BYTE_OFFSET:] = 1
    return table

  exact_table = True  # the table alone gives every document's decoded bytes


class SentencePieceTokenizer:
  name = "sentencepiece"
  exact_table = False

  def __init__(self, path):
    import sentencepiece as spm
    self.path = path
    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f"cannot load the sentencepiece model {path}: "
                           f"{str(e).strip().splitlines()[-1]}") from e
    self.vocab_size = self._sp.vocab_size()
    self.eos_id, self.bos_id, self.pad_id = self._sp.eos_id(), self._sp.bos_id(), self._sp.pad_id()
    self.sha256 = _file_sha256(path)
    self._table = None

  def encode(self, string: str) -> np.ndarray:
    return np.asarray(self._sp.encode(string), np.int32)

  def decode(self, tokens: Any) -> str:
    sp = self._sp
    ids = [int(t) for t in np.asarray(tokens).tolist()
           if 0 <= t < self.vocab_size and not sp.is_control(int(t))]
    return sp.decode(ids)

  def special_ids(self) -> dict[str, int]:
    ids = {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id, "unk": self._sp.unk_id()}
    return {k: v for k, v in ids.items() if v >= 0}

  @property
  def token_bytes(self) -> np.ndarray:
    if self._table is None:
      sp = self._sp
      table = np.zeros(self.vocab_size, np.int32)
      for i in range(self.vocab_size):
        if sp.is_byte(i):
          table[i] = 1
        elif not (sp.is_control(i) or sp.is_unused(i)):  # unknown: what decode prints for it
          piece = " \u2047 " if sp.is_unknown(i) else sp.id_to_piece(i).replace("\u2581", " ")
          table[i] = len(piece.encode("utf-8"))
      self._table = table
    return self._table


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer; encode adds no special tokens, decode skips them."""
  name = "hf"
  exact_table = False

  def __init__(self, path, eos_token=None):
    try:
      import tokenizers
    except ImportError as e:
      raise TokenizerError("Hugging Face tokenizers need the `tokenizers` package "
                           "(pip install -r requirements.txt)") from e
    if os.path.isdir(path):
      path = os.path.join(path, HF_FILE)
    if not os.path.isfile(path):
      raise TokenizerError(f"no Hugging Face tokenizer file at {path}")
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises plain Exception on a bad file
      raise TokenizerError(f"cannot load the Hugging Face tokenizer {path}: "
                           f"{str(e).strip().splitlines()[0]}") from e
    self.path = path
    self.sha256 = _file_sha256(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self._specials = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()
                      if t.special}
    self.eos_id = self._find_eos(eos_token)
    self.bos_id = self.pad_id = -1
    self._table = None

  def _find_eos(self, eos_token):
    if eos_token is None:
      config = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
      if os.path.exists(config):
        with open(config, encoding="utf-8") as f:
          eos_token = json.load(f).get("eos_token")
        if isinstance(eos_token, dict):
          eos_token = eos_token.get("content")
    candidates = [eos_token] if eos_token else HF_EOS_CANDIDATES
    for token in candidates:
      token_id = self._tok.token_to_id(token)
      if token_id is not None:
        return token_id
    raise TokenizerError(f"the Hugging Face tokenizer {self.path} has no end-of-document token "
                         f"{eos_token!r}" if eos_token else
                         f"found none of {list(HF_EOS_CANDIDATES)} in the Hugging Face tokenizer "
                         f"{self.path}: name its end-of-document token (--eos_token=...)")

  def encode(self, string: str) -> np.ndarray:
    return np.asarray(self._tok.encode(string, add_special_tokens=False).ids, np.int32)

  def decode(self, tokens: Any) -> str:
    ids = [int(t) for t in np.asarray(tokens).tolist() if 0 <= t < self.vocab_size]
    return self._tok.decode(ids, skip_special_tokens=True)

  def special_ids(self) -> dict[str, int]:
    return {content: i for i, content in sorted(self._specials.items())}

  @property
  def token_bytes(self) -> np.ndarray:
    if self._table is None:
      decoder = json.loads(self._tok.to_str()).get("decoder") or {}
      kinds = {d.get("type") for d in decoder.get("decoders", [])} | {decoder.get("type")}
      byte_level = "ByteLevel" in kinds  # each character of a token stands for one byte
      table = np.zeros(self.vocab_size, np.int32)
      for i in range(self.vocab_size):
        token = self._tok.id_to_token(i)
        if token is None or i in self._specials:
          continue
        if byte_level and not self._is_added(i):
          table[i] = len(token)
        elif _BYTE_PIECE.match(token):
          table[i] = 1
        else:
          table[i] = len(self._tok.decode([i], skip_special_tokens=True).encode("utf-8"))
      self._table = table
    return self._table

  def _is_added(self, i):
    return i in self._tok.get_added_tokens_decoder()


def load(spec: str, eos_token: Optional[str] = None) -> Any:
  """The tokenizer named by `spec`: "bytes", a sentencepiece `.model` file, or a Hugging Face
  `tokenizer.json` (or a directory holding one). Raises TokenizerError."""
  if spec == "bytes":
    return ByteTokenizer()
  if not os.path.exists(spec):
    raise TokenizerError(f"tokenizer {spec!r}: no such file or directory (expected 'bytes', a "
                         "sentencepiece .model file, or a Hugging Face tokenizer.json or its "
                         "directory)")
  if os.path.isdir(spec) or spec.endswith(".json"):
    return HFTokenizer(spec, eos_token)
  return SentencePieceTokenizer(spec)


def identity(tok: Any) -> dict:
  """What identifies a tokenizer in prepared data's metadata (JSON-able)."""
  return {"kind": tok.name, "sha256": tok.sha256, "vocab_size": int(tok.vocab_size),
          "eos_id": int(tok.eos_id), "bos_id": int(tok.bos_id), "pad_id": int(tok.pad_id),
          "special_ids": {k: int(v) for k, v in tok.special_ids().items()}}


def document_arrays(tok: Any, string: str | bytes) -> tuple[np.ndarray, np.ndarray]:
  """(ids, bytes): a document's token ids followed by the end-of-document id (int32), and the
  UTF-8 bytes each of them decodes to (int32; 0 for the end-of-document id). The bytes add up
  to the UTF-8 length of the decoded document (see the module docstring)."""
  if isinstance(string, bytes):
    string = string.decode("utf-8", errors="replace")
  ids = tok.encode(string)
  nbytes = tok.token_bytes[ids]
  if not tok.exact_table and len(ids):
    excess = int(nbytes.sum()) - len(tok.decode(ids).encode("utf-8"))
    if excess < 0:
      nbytes[0] -= excess
    else:  # the decoder dropped bytes (a leading space): take them from the first tokens
      for i in range(len(nbytes)):
        take = min(excess, int(nbytes[i]))
        nbytes[i] -= take
        excess -= take
        if not excess:
          break
  ids = np.append(ids, tok.eos_id).astype(np.int32)
  return ids, np.append(nbytes, 0).astype(np.int32)


def train_sentencepiece(documents: Iterable[str], vocab_size: int, path: str,
                        max_documents: int = 20_000) -> None:
  """Trains a unigram model on `documents` (strings) with ftjax's special ids; writes `path`."""
  import sentencepiece as spm
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(documents), model_writer=proto, vocab_size=vocab_size,
      model_type="unigram", pad_id=text.PAD, bos_id=text.BOS, eos_id=text.EOS, unk_id=3,
      byte_fallback=True, input_sentence_size=max_documents, shuffle_input_sentence=True,
      minloglevel=2)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    f.write(proto.getvalue())
  os.replace(path + ".tmp", path)


def run_copy(run_dir: Optional[str]) -> Optional[str]:
  """The tokenizer file a run saved in `run_dir`, or None."""
  from ftjax import storage
  for name in (RUN_FILE, HF_FILE):
    if run_dir and storage.exists(os.path.join(run_dir, name)):
      return storage.local_copy(os.path.join(run_dir, name))
  return None


def make_tokenizer(cfg: Any, run_dir: Optional[str] = None) -> Any:
  """The tokenizer of a built-in corpus (`cfg.data`); a run's own copy (in `run_dir`) wins over
  the data directory."""
  d = cfg.data
  if d.tokenizer == "bytes":
    return ByteTokenizer()
  saved = run_copy(run_dir)
  if saved and saved.endswith(RUN_FILE):
    return SentencePieceTokenizer(saved)
  from ftjax.data import corpora
  path = os.path.join(corpora.data_dir(d.data_dir), f"{d.name}_spm{d.sentencepiece_vocab}.model")
  if not os.path.exists(path):
    source = corpora.data_source(d.name, "train", d.data_dir)
    docs = (source[i]["text"].decode("utf-8", errors="replace") for i in range(len(source)))
    train_sentencepiece(docs, d.sentencepiece_vocab, path)
  return SentencePieceTokenizer(path)


def save_with_run(tokenizer: Any, run_dir: str) -> None:
  """Copies a file tokenizer into the run directory (bytes need nothing)."""
  path = getattr(tokenizer, "path", None)
  if not path:
    return
  from ftjax import storage
  target = os.path.join(run_dir, RUN_FILES[tokenizer.name])
  if storage.is_url(target):
    with open(path, "rb") as f:
      storage.write_bytes(target, f.read())
  elif os.path.abspath(path) != os.path.abspath(target):
    os.makedirs(run_dir, exist_ok=True)
    shutil.copyfile(path, target + ".tmp")
    os.replace(target + ".tmp", target)
