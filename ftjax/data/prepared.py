"""Prepared corpora: token ids in array_record shards, written by `launch.prepare_data`.

A prepared directory holds

    metadata.json                    written last: its presence means the preparation finished
    plan.json                        the settings (inputs, tokenizer, sharding); a re-run with
                                     other settings into the same directory is refused
    tokenizer.model | tokenizer.json a copy of the tokenizer file (none for `bytes`)
    train-FFFFF-CCCCC.array_record   one per chunk of `docs_per_shard` documents of input file
    validation-FFFFF-CCCCC.array_record  F (those chunks' held-out documents)
    parts/FFFFF-CCCCC.json           a chunk's counts, written once its shards are complete

One record per document: its token ids followed by the end-of-document id as little-endian
uint32, then the UTF-8 bytes each id decodes to as little-endian uint16 (0 for the
end-of-document id; `ftjax.data.tokenizers.document_arrays`). Every `validation_every`-th document
of each input file (counted from its first) is held out for the validation split; a file with
fewer documents holds out the last 1/`validation_every` of its text instead, so that the
validation split is never empty.

A re-run skips the chunks whose `parts/*.json` exists; shards are written under a temporary name
and renamed when complete, so an interrupted run leaves no shard and no metadata that looks
complete. On a bucket (`gs://`, `s3://`) the directory is written through a local staging folder:
each chunk's shards are uploaded, then its `parts/*.json`, and metadata.json last; readers copy
the shards they open into the local cache folder (`storage.local_copy`).
"""

import dataclasses
import gzip
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from ftjax import storage
from ftjax.data import tokenizers
from ftjax.errors import CorpusError, StorageError, TokenizerError

FORMAT = "ftjax.prepared/1"
METADATA = "metadata.json"
PLAN = "plan.json"
SPLITS = ("train", "validation")
SMALL_VALIDATION_TOKENS = 65_536  # fewer held-out tokens than this gets a warning
FORMATS = ("auto", "jsonl", "parquet", "text")
TEXT_UNITS = ("file", "line")
PREPARE_COMMAND = "python -m launch.prepare_data --input=GLOB --output=DIR --tokenizer=SPEC"


# ------------------------------------------------------------------------------------- records

def encode_record(ids, nbytes):
  if len(nbytes) and int(np.max(nbytes)) > np.iinfo(np.uint16).max:
    raise CorpusError("a token decodes to more than 65535 bytes")
  return (np.asarray(ids, "<u4").tobytes() + np.asarray(nbytes, "<u2").tobytes())


def decode_record(record):
  """{'tokens', 'nbytes'} int32 arrays of one document's record."""
  n = len(record) // 6
  if len(record) != 6 * n:
    raise CorpusError(f"a record of {len(record)} bytes is not a prepared document")
  return {"tokens": np.frombuffer(record, "<u4", n).astype(np.int32),
          "nbytes": np.frombuffer(record, "<u2", n, offset=4 * n).astype(np.int32)}


# ------------------------------------------------------------------------------------- reading

def load_metadata(path):
  """The metadata of the prepared directory `path`; CorpusError when it is not one."""
  if not path:
    raise CorpusError("no prepared data given: set data.path (make it with "
                      f"`{PREPARE_COMMAND}`)")
  path = os.path.expanduser(path)
  meta_path = storage.join(path, METADATA)
  try:
    storage.use_bucket(path)
  except StorageError as e:
    raise CorpusError(str(e)) from None
  try:
    found = storage.exists(meta_path)
    if not found:
      what = ("preparation did not finish: run launch.prepare_data again with the same flags"
              if storage.exists(storage.join(path, PLAN)) else
              f"not a prepared directory: make it with `{PREPARE_COMMAND}`")
    else:
      meta = json.loads(storage.read_bytes(meta_path))
  except (OSError, json.JSONDecodeError) as e:
    raise CorpusError(f"{meta_path}: unreadable ({e})") from e
  if not found:
    raise CorpusError(f"{path}: no {METADATA} ({what})")
  if meta.get("format") != FORMAT:
    raise CorpusError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  return meta


def tokenizer_of(path, meta):
  """The tokenizer a prepared directory was made with (its saved copy)."""
  tok = meta["tokenizer"]
  if tok["kind"] == "bytes":
    return tokenizers.ByteTokenizer()
  file = storage.join(os.path.expanduser(path), tokenizers.RUN_FILES[tok["kind"]])
  try:
    local = storage.local_copy(file)
  except OSError as e:
    raise CorpusError(f"{file}: cannot read the prepared directory's tokenizer ({e})") from e
  try:
    loaded = (tokenizers.SentencePieceTokenizer(local) if tok["kind"] == "sentencepiece" else
              tokenizers.HFTokenizer(local, eos_token=_eos_token(tok)))
  except TokenizerError as e:
    raise CorpusError(str(e)) from e
  if loaded.sha256 != tok["sha256"]:
    raise CorpusError(f"{file} is not the tokenizer {METADATA} names (sha256 differs)")
  return loaded


def _eos_token(tok):
  by_id = {v: k for k, v in tok["special_ids"].items()}
  return by_id.get(tok["eos_id"])


class ShardSource:
  """Random access to the documents of one split: {'tokens', 'nbytes'} per index."""

  def __init__(self, path, split, meta):
    import grain
    import array_record.python.array_record_module as arm
    entries = meta["splits"][split]["shards"]
    if not entries:
      raise CorpusError(f"{path}: the {split} split holds no documents")
    files = []
    for entry in entries:
      file = storage.join(os.path.expanduser(path), entry["file"])
      try:
        local = storage.local_copy(file)
        reader = arm.ArrayRecordReader(local)
        count = reader.num_records()
        first = reader.read([0])[0] if count else b""
        reader.close()
        decode_record(first)
      except (OSError, RuntimeError, ValueError, CorpusError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CorpusError(f"cannot read shard {file} ({reason}): missing, corrupt or truncated "
                          "(prepare it again)") from e
      if count != entry["documents"]:
        raise CorpusError(f"shard {file} holds {count} records, {METADATA} says "
                          f"{entry['documents']}: corrupt or truncated (prepare it again)")
      files.append(local)
    self._source = grain.sources.ArrayRecordDataSource(files)
    self.path = path

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return decode_record(self._source[index])


# ------------------------------------------------------------------------------------- inputs

def match_inputs(pattern):
  try:
    files = storage.glob(pattern)
  except OSError as e:
    raise CorpusError(f"--input={pattern!r}: cannot list ({e})") from e
  if not files:
    raise CorpusError(f"--input={pattern!r} matches no file")
  return files


def file_format(path, fmt="auto"):
  if fmt != "auto":
    return fmt
  name = path.lower().removesuffix(".gz")
  if name.endswith((".jsonl", ".json", ".ndjson")):
    return "jsonl"
  if name.endswith(".parquet"):
    return "parquet"
  return "text"


def _open_text(path):
  if path.lower().endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8", errors="replace")
  return open(path, encoding="utf-8", errors="replace")


def read_documents(path, fmt="auto", text_key="text", text_unit="file"):
  """The documents (strings) of one input file, in order; CorpusError names the file and line
  of a bad one."""
  fmt = file_format(path, fmt)
  try:
    local = storage.local_copy(path)  # a bucket's file: downloaded into the cache folder
    if fmt == "jsonl":
      with _open_text(local) as f:
        for number, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{number}: not valid JSON ({e.msg})") from e
          if not isinstance(row, dict) or text_key not in row:
            raise CorpusError(f"{path}:{number}: no {text_key!r} key (set --text_key)")
          if not isinstance(row[text_key], str):
            raise CorpusError(f"{path}:{number}: {text_key!r} is not a string")
          yield row[text_key]
    elif fmt == "parquet":
      import pyarrow.parquet as pq
      try:
        parquet = pq.ParquetFile(local)
      except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from e
      if text_key not in parquet.schema_arrow.names:
        raise CorpusError(f"{path}: no {text_key!r} column (set --text_key); columns: "
                          f"{parquet.schema_arrow.names}")
      for batch in parquet.iter_batches(columns=[text_key], batch_size=1024):
        for value in batch.column(0).to_pylist():
          if value is not None:
            yield value
    elif fmt == "text":
      with _open_text(local) as f:
        if text_unit == "file":
          yield f.read()
        else:
          for line in f:
            if line.strip():
              yield line.rstrip("\n")
    else:
      raise CorpusError(f"unknown format {fmt!r}; known: {FORMATS}")
  except (OSError, EOFError, UnicodeError) as e:
    raise CorpusError(f"{path}: cannot read ({e})") from e


# ------------------------------------------------------------------------------------- writing

@dataclasses.dataclass(frozen=True)
class Settings:
  inputs: tuple
  tokenizer: str
  eos_token: str = ""
  format: str = "auto"
  text_key: str = "text"
  text_unit: str = "file"
  docs_per_shard: int = 10_000
  validation_every: int = 100

  def check(self):
    if self.format not in FORMATS:
      raise CorpusError(f"--format must be one of {FORMATS}, got {self.format!r}")
    if self.text_unit not in TEXT_UNITS:
      raise CorpusError(f"--text_unit must be one of {TEXT_UNITS}, got {self.text_unit!r}")
    if self.docs_per_shard < 1:
      raise CorpusError(f"--docs_per_shard must be >= 1, got {self.docs_per_shard}")
    if self.validation_every < 2:
      raise CorpusError(f"--validation_every must be >= 2, got {self.validation_every}")


_WORKER_TOKENIZER = None


def _init_worker(spec, eos_token):
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = tokenizers.load(spec, eos_token or None)


def _write_chunk(out, chunk_id, docs):
  """Tokenises one chunk of (split, document) pairs and writes its shards and
  parts/<chunk>.json."""
  import array_record.python.array_record_module as arm
  tok = _WORKER_TOKENIZER
  counts = {}
  temps = []
  try:
    writers, stats = {}, {split: [0, 0, 0] for split in SPLITS}  # documents, tokens, bytes
    for split, doc in docs:
      ids, nbytes = tokenizers.document_arrays(tok, doc)
      if split not in writers:
        temp = os.path.join(out, f"{split}-{chunk_id}.array_record.tmp{os.getpid()}")
        temps.append(temp)
        writers[split] = arm.ArrayRecordWriter(temp, "group_size:1")
      writers[split].write(encode_record(ids, nbytes))
      s = stats[split]
      s[0], s[1], s[2] = s[0] + 1, s[1] + len(ids), s[2] + int(nbytes.sum())
    for split, writer in writers.items():
      writer.close()
    for split in SPLITS:
      documents, tokens, nbytes = stats[split]
      name = f"{split}-{chunk_id}.array_record" if documents else None
      if name:
        os.replace(os.path.join(out, f"{name}.tmp{os.getpid()}"), os.path.join(out, name))
      counts[split] = {"file": name, "documents": documents, "tokens": tokens, "bytes": nbytes}
  except BaseException:
    for temp in temps:
      if os.path.exists(temp):
        os.remove(temp)
    raise
  part = os.path.join(out, "parts", f"{chunk_id}.json")
  with open(part + ".tmp", "w", encoding="utf-8") as f:
    json.dump(counts, f)
  os.replace(part + ".tmp", part)
  return chunk_id, counts


def _chunks(settings, done):
  """(chunk id, its (split, document) pairs) to tokenise, in order; chunks in `done` are read
  past, not returned. Every `validation_every`-th document of a file is held out; a file with
  fewer documents holds out the end of its text instead (`_hold_out_tail`), so that every file
  contributes to the validation split."""
  every = settings.validation_every
  for file_index, path in enumerate(settings.inputs):
    chunk, number, count = [], 0, 0
    for doc in read_documents(path, settings.format, settings.text_key, settings.text_unit):
      if len(chunk) == settings.docs_per_shard:
        chunk_id = f"{file_index:05d}-{number:05d}"
        if chunk_id not in done:
          yield chunk_id, chunk
        chunk, number = [], number + 1
      chunk.append(("validation" if count % every == every - 1 else "train", doc))
      count += 1
    if count < every:
      chunk = _hold_out_tail(chunk, every)
    chunk_id = f"{file_index:05d}-{number:05d}"
    if chunk and chunk_id not in done:
      yield chunk_id, chunk


def _hold_out_tail(docs, every):
  """The (split, document) pairs of a file's last chunk with the final 1/`every` of their text
  held out: trailing documents whole, and the one the cut falls in split at a line break (at the
  cut if it has none after it), its head for training, its tail for validation."""
  budget = max(sum(len(doc) for _, doc in docs) // every, 1)
  out = list(docs)
  for i in range(len(out) - 1, -1, -1):
    doc = out[i][1]
    if len(doc) <= budget:
      out[i] = ("validation", doc)
      budget -= len(doc)
      continue
    cut = doc.find("\n", len(doc) - budget)
    cut = len(doc) - budget if cut < 0 or cut == len(doc) - 1 else cut + 1
    out[i:i + 1] = [("train", doc[:cut]), ("validation", doc[cut:])]
    break
  return out


def _write_json(path, value):
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def prepare(settings, out, num_workers=1, progress=None, progress_every=2.0):
  """Tokenises `settings.inputs` into the prepared directory `out` (a local folder or a gs:// /
  s3:// prefix); returns its metadata.

  `num_workers` processes tokenise chunks in parallel (1: in this process). `progress(line)` is
  called at most every `progress_every` seconds and at the end. Raises CorpusError (bad input,
  tokenizer, or an `out` that holds another preparation).
  """
  if not storage.is_url(out):
    return _prepare_in(settings, out, out, num_workers, progress, progress_every)
  stage = tempfile.mkdtemp(prefix="ftjax-prepare-")
  try:  # the bucket's plan and finished chunks first: a re-run resumes as it does locally
    os.makedirs(os.path.join(stage, "parts"))
    for rel in [PLAN, *(f"parts/{n}" for n in storage.listdir(storage.join(out, "parts")))]:
      if storage.exists(storage.join(out, rel)):
        storage.write_bytes(os.path.join(stage, rel), storage.read_bytes(storage.join(out, rel)))

    def upload_chunk(chunk_id, counts):  # its shards, then its part (which marks it done)
      for c in counts.values():
        if c["file"]:
          storage.upload_tree(stage, out, only=(c["file"],))
          os.remove(os.path.join(stage, c["file"]))
      storage.upload_tree(stage, out, only=(f"parts/{chunk_id}.json",))

    meta = _prepare_in(settings, stage, out, num_workers, progress, progress_every, upload_chunk)
    storage.upload_tree(stage, out, last=(METADATA,))
    return meta
  except OSError as e:
    raise CorpusError(f"{out}: cannot write the prepared directory ({e})") from e
  finally:
    shutil.rmtree(stage, ignore_errors=True)


def _prepare_in(settings, out, shown, num_workers, progress, progress_every, chunk_done=None):
  """`prepare` into the local folder `out` (`shown`: its name in messages); `chunk_done(chunk_id,
  counts)` is called in this process after each chunk is written."""
  settings.check()
  try:
    tok = tokenizers.load(settings.tokenizer, settings.eos_token or None)
  except TokenizerError as e:
    raise CorpusError(str(e)) from e
  plan = {"format": FORMAT, "inputs": list(settings.inputs), "tokenizer": tokenizers.identity(tok),
          **{k: v for k, v in dataclasses.asdict(settings).items() if k not in ("inputs", "tokenizer")}}
  os.makedirs(os.path.join(out, "parts"), exist_ok=True)
  plan_path = os.path.join(out, PLAN)
  if os.path.exists(plan_path):
    with open(plan_path, encoding="utf-8") as f:
      old = json.load(f)
    if old != plan:
      changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
      raise CorpusError(f"{shown} holds a preparation with other settings ({', '.join(changed)}): "
                        "use another --output")
  else:
    _write_json(plan_path, plan)
  for name in os.listdir(out):  # temporaries of an interrupted run
    if ".tmp" in name:
      os.remove(os.path.join(out, name))
  if tok.path:  # the run directory's copy of the tokenizer comes from here
    tokenizers.save_with_run(tok, out)
  done = {name.removesuffix(".json") for name in os.listdir(os.path.join(out, "parts"))
          if name.endswith(".json")}
  skipped = len(done)
  start, written, tokens, shown_at = time.monotonic(), 0, 0, 0.0

  def finished(result, last=False):
    nonlocal written, tokens, shown_at
    if result is not None:
      chunk_id, counts = result
      if chunk_done:
        chunk_done(chunk_id, counts)
      written += 1
      tokens += sum(c["tokens"] for c in counts.values())
    now = time.monotonic()
    if progress and (last or now - shown_at >= progress_every):
      shown_at = now
      progress(f"{written} chunks written ({skipped} done before), {tokens:,} tokens, "
               f"{tokens / max(now - start, 1e-9):,.0f} tokens/s")

  chunks = _chunks(settings, done)
  if num_workers <= 1:
    _init_worker(settings.tokenizer, settings.eos_token)
    for chunk_id, docs in chunks:
      finished(_write_chunk(out, chunk_id, docs))
  else:
    context = multiprocessing.get_context("spawn")  # no forked jax/grain state in the workers
    with context.Pool(num_workers, _init_worker, (settings.tokenizer, settings.eos_token)) as pool:
      pending = []
      for chunk_id, docs in chunks:
        pending.append(pool.apply_async(_write_chunk, (out, chunk_id, docs)))
        while len(pending) >= 2 * num_workers:  # bounded: the corpus is never all in memory
          finished(pending.pop(0).get())
      for result in pending:
        finished(result.get())
  finished(None, last=True)
  if not any(name.endswith(".json") for name in os.listdir(os.path.join(out, "parts"))):
    raise CorpusError(f"no documents in the {len(settings.inputs)} input files")
  return write_metadata(out, plan)


def write_metadata(out, plan):
  parts = sorted(name for name in os.listdir(os.path.join(out, "parts")) if name.endswith(".json"))
  splits = {split: {"shards": [], "documents": 0, "tokens": 0, "bytes": 0} for split in SPLITS}
  for name in parts:
    with open(os.path.join(out, "parts", name), encoding="utf-8") as f:
      counts = json.load(f)
    for split in SPLITS:
      c = counts[split]
      if c["file"]:
        splits[split]["shards"].append(c)
      for key in ("documents", "tokens", "bytes"):
        splits[split][key] += c[key]
  meta = {"format": FORMAT, "tokenizer": plan["tokenizer"], "splits": splits,
          "record": "uint32 ids (last: end of document), then uint16 UTF-8 bytes per id",
          "settings": {k: v for k, v in plan.items() if k not in ("format", "tokenizer")}}
  _write_json(os.path.join(out, METADATA), meta)
  return meta


def summary(meta):
  lines = []
  for split in SPLITS:
    s = meta["splits"][split]
    lines.append(f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens, "
                 f"{s['bytes']:,} bytes in {len(s['shards'])} shards")
  held_out = meta["splits"]["validation"]["tokens"]
  if held_out < SMALL_VALIDATION_TOKENS:
    lines.append(f"warning: the validation split holds {held_out:,} tokens, fewer than "
                 f"{SMALL_VALIDATION_TOKENS:,}: evaluations will repeat it (train.eval_batches "
                 "is checked against it at start-up); a smaller --validation_every holds out more")
  tok = meta["tokenizer"]
  lines.append(f"tokenizer: {tok['kind']} (vocabulary {tok['vocab_size']:,}, end of document "
               f"{tok['eos_id']}, sha256 {tok['sha256'][:12]})")
  return lines


def eprint(line):
  print(line, file=sys.stderr, flush=True)
