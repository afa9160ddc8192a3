"""Prepared corpora: launch.prepare_data's inputs, tokenizers, shards and metadata, resuming and
errors; the packed batches' segment ids, positions and target bytes (hand counts for bytes,
sentencepiece and Hugging Face tokenizers); exact bits per byte; mixtures; training on it."""

import gzip
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ftjax import configs, trainer as trainer_lib
from ftjax.data import make_source, pipeline, prepared, text, tokenizers
from ftjax.data.mixture import parse_mixture
from tests.conftest import REPO, resolved
from ftjax.trainer import load_run

DOCS = [f"document {i}: héllo wörld — {'x' * (i % 7)}" for i in range(60)]


def _hf_tokenizer(path, kind="bpe"):
  """A tiny Hugging Face tokenizer trained here: byte-level BPE, or a whitespace WordLevel."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  corpus = DOCS + ["the cat sat on the mat", "naïve café 日本"]
  if kind == "bpe":
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  else:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with single spaces
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"])
  tok.train_from_iterator(corpus, trainer)
  tok.save(str(path))
  return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """JSON lines (gzipped), Parquet and plain-text inputs of the same documents."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  root = tmp_path_factory.mktemp("corpus")
  with gzip.open(root / "a.jsonl.gz", "wt", encoding="utf-8") as f:
    for doc in DOCS[:40]:
      f.write(json.dumps({"text": doc, "id": 1}) + "\n")
  pq.write_table(pa.table({"text": DOCS[40:55]}), root / "b.parquet")
  (root / "c.txt").write_text("\n".join(DOCS[55:]) + "\n\n", encoding="utf-8")
  return root


def _prepare(corpus, out, tokenizer="bytes", **kw):
  kw = {"text_unit": "line", "docs_per_shard": 16, "validation_every": 10, **kw}
  settings = prepared.Settings(inputs=tuple(prepared.match_inputs(str(corpus / "*"))),
                               tokenizer=tokenizer, **kw)
  return prepared.prepare(settings, str(out))


def _all_docs(path, split):
  meta = prepared.load_metadata(str(path))
  source = prepared.ShardSource(str(path), split, meta)
  return [source[i] for i in range(len(source))]


def test_prepare_reads_every_format_and_holds_out_every_nth_document(corpus, tmp_path):
  meta = _prepare(corpus, tmp_path)
  train, val = meta["splits"]["train"], meta["splits"]["validation"]
  # per file, every 10th document (counted from the file's first) is held out; c.txt has 5
  # documents, fewer than 10: the last tenth of its text (the end of its last line) instead
  held = [DOCS[i] for i in (9, 19, 29, 39)] + [DOCS[40 + 9]]
  tail = len("".join(DOCS[55:])) // 10
  c_head, c_tail = DOCS[59][:-tail], DOCS[59][-tail:]
  assert val["documents"] == len(held) + 1 and train["documents"] == len(DOCS) - len(held)
  decoded = lambda split: sorted(text.decode(d["tokens"][:-1]) for d in _all_docs(tmp_path, split))
  assert decoded("validation") == sorted(held + [c_tail])
  assert decoded("train") == sorted([d for d in DOCS[:59] if d not in held] + [c_head])
  docs = _all_docs(tmp_path, "train") + _all_docs(tmp_path, "validation")
  assert all(d["tokens"][-1] == text.EOS and d["nbytes"][-1] == 0 for d in docs)
  assert train["bytes"] + val["bytes"] == sum(len(d.encode()) for d in DOCS)
  assert train["tokens"] + val["tokens"] == sum(len(d.encode()) + 1 for d in DOCS) + 1  # 2 EOS
  assert meta["tokenizer"]["kind"] == "bytes" and meta["tokenizer"]["eos_id"] == text.EOS
  # a.jsonl.gz: 40 documents in chunks of 16 -> 3 train shards
  assert [s["file"] for s in train["shards"]][:3] == [
      "train-00000-00000.array_record", "train-00000-00001.array_record",
      "train-00000-00002.array_record"]


def test_rerun_skips_finished_shards_and_refuses_other_settings(corpus, tmp_path):
  _prepare(corpus, tmp_path)
  os.remove(tmp_path / "metadata.json")
  os.remove(tmp_path / "parts" / "00000-00001.json")  # as if interrupted during that chunk
  (tmp_path / "train-00000-00001.array_record").unlink()
  (tmp_path / "train-00000-00002.array_record.tmp123").write_bytes(b"half")
  kept = (tmp_path / "train-00000-00000.array_record").stat().st_mtime_ns
  with pytest.raises(text.CorpusError, match="preparation did not finish"):
    prepared.load_metadata(str(tmp_path))
  lines = []
  settings = prepared.Settings(inputs=tuple(prepared.match_inputs(str(corpus / "*"))),
                               tokenizer="bytes", text_unit="line", docs_per_shard=16,
                               validation_every=10)
  meta = prepared.prepare(settings, str(tmp_path), progress=lines.append)
  assert "1 chunks written (4 done before)" in lines[-1]
  assert (tmp_path / "train-00000-00000.array_record").stat().st_mtime_ns == kept
  assert not list(tmp_path.glob("*.tmp*"))
  assert meta["splits"]["train"]["documents"] == len(DOCS) - 5
  with pytest.raises(text.CorpusError, match=r"other settings \(docs_per_shard\)"):
    prepared.prepare(prepared.Settings(**{**settings.__dict__, "docs_per_shard": 8}),
                     str(tmp_path))


def test_parallel_workers_write_the_same_shards(corpus, tmp_path):
  one = _all_docs_of(corpus, tmp_path / "one", 1)
  two = _all_docs_of(corpus, tmp_path / "two", 2)
  assert len(one) == len(two) and all((a["tokens"] == b["tokens"]).all() for a, b in zip(one, two))


def _all_docs_of(corpus, out, workers):
  settings = prepared.Settings(inputs=tuple(prepared.match_inputs(str(corpus / "*"))),
                               tokenizer="bytes", text_unit="line", docs_per_shard=16)
  prepared.prepare(settings, str(out), num_workers=workers)
  return _all_docs(out, "train")


def _cli(*flags):
  return subprocess.run([sys.executable, "-m", "launch.prepare_data", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_bad_inputs_exit_2_with_one_line(tmp_path):
  (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n{"body": "no text key"}\n')
  bad_tok = tmp_path / "tokenizer.json"
  bad_tok.write_text("{not json")
  cases = [
      ((f"--input={tmp_path}/*.nothing", f"--output={tmp_path}/o1"), "matches no file"),
      ((f"--input={tmp_path}/in.jsonl", f"--output={tmp_path}/o2", "--num_workers=1"),
       "in.jsonl:2: no 'text' key"),
      ((f"--input={tmp_path}/in.jsonl", f"--output={tmp_path}/o3", f"--tokenizer={bad_tok}"),
       "cannot load the Hugging Face tokenizer"),
  ]
  for flags, message in cases:
    result = _cli(*flags)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and result.stderr.strip().splitlines()[-1].startswith(
        "data error:"), result.stderr
    assert len([l for l in result.stderr.splitlines() if l.startswith("data error")]) == 1
  assert not os.path.exists(tmp_path / "o2" / "metadata.json")  # nothing looks complete


def test_corrupt_or_missing_shards_are_one_line_errors(corpus, tmp_path):
  _prepare(corpus, tmp_path)
  shard = tmp_path / "train-00000-00001.array_record"
  meta = prepared.load_metadata(str(tmp_path))
  good = shard.read_bytes()
  for damaged in (good[:len(good) // 2], b"\0garbage" * 64, b"\0garbage" * 10_000):
    shard.write_bytes(damaged)
    with pytest.raises(text.CorpusError, match=r"shard .*train-00000-00001\.array_record.*"
                       "corrupt or truncated"):
      prepared.ShardSource(str(tmp_path), "train", meta)
  shard.unlink()
  with pytest.raises(text.CorpusError, match="cannot read shard"):
    prepared.ShardSource(str(tmp_path), "train", prepared.load_metadata(str(tmp_path)))


def _expected_bytes(tok, doc):
  """Hand count of the bytes each token of `doc` stands for, then 0 for end of document."""
  ids = tok.encode(doc)
  if tok.name == "bytes":
    per = [1] * len(ids)
  elif tok.name == "sentencepiece":
    per = []
    for i, t in enumerate(ids):
      piece = tok._sp.id_to_piece(int(t))
      n = 1 if tok._sp.is_byte(int(t)) else len(piece.replace("\u2581", " ").encode())
      per.append(n - 1 if i == 0 and piece.startswith("\u2581") else n)  # decode drops it
  else:  # byte-level BPE: a token's characters map one to one to bytes
    per = [len(tok._tok.id_to_token(int(t))) for t in ids]
  return per + [0]


@pytest.fixture(scope="module")
def three_tokenizers(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  tokenizers.train_sentencepiece(DOCS * 20, 300, str(root / "sp.model"))
  return {"bytes": tokenizers.load("bytes"), "sentencepiece": tokenizers.load(str(root / "sp.model")),
          "hf": tokenizers.load(_hf_tokenizer(root / "tokenizer.json"))}


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece", "hf"])
def test_packed_batch_segments_positions_and_target_bytes_by_hand(three_tokenizers, kind):
  tok = three_tokenizers[kind]
  docs = ["héllo wörld", "naïve — café", "ok 日本"]
  arrays = [tokenizers.document_arrays(tok, d) for d in docs]
  for (ids, nbytes), doc in zip(arrays, docs):  # per token: the hand count
    assert nbytes.tolist() == _expected_bytes(tok, doc), doc
    assert nbytes.sum() == len(tok.decode(ids).encode()) and ids[-1] == tok.eos_id
  length = sum(len(ids) for ids, _ in arrays)
  it = pipeline.batches([{"i": i} for i in range(3)],
                        lambda ex: dict(zip(("tokens", "nbytes"), arrays[ex["i"]])),
                        seed=0, seq_len=length + 3, batch_size=1, repeat=False)
  batch = next(it)
  seg, pos, tb = batch["segment_ids"][0], batch["positions"][0], batch["target_bytes"][0]
  targets, inputs = batch["targets"][0], batch["inputs"][0]
  # hand count: every target but the very first token is scored; its bytes are the bytes of the
  # token it predicts; padding is segment 0 with 0 bytes
  scored = seg > 0
  assert scored.sum() == length - 1 and (seg[length - 1:] == 0).all() and (tb[~scored] == 0).all()
  total = sum(len(tok.decode(ids).encode()) for ids, _ in arrays)
  first = int(inputs[0])
  first_doc = next(a for a in arrays if a[0][0] == first)
  assert tb[scored].sum() == total - first_doc[1][0]
  # a document's tokens and its end token are the targets of one segment; the end token of a
  # document opens the next segment at position 0
  eos_at = np.flatnonzero(targets[:length - 1] == tok.eos_id)
  assert len(eos_at) == 3 and (seg[eos_at] == [1, 2, 3]).all()
  for k in eos_at[:2]:
    assert inputs[k + 1] == tok.eos_id and seg[k + 1] == seg[k] + 1 and pos[k + 1] == 0
  for s in (2, 3):
    assert (pos[seg == s] == np.arange((seg == s).sum())).all()
  assert (pos[seg == 1] == np.arange(1, (seg == 1).sum() + 1)).all()  # its start token is cut


def test_hf_wordlevel_tokenizer_bytes_add_up_to_the_decoded_text(tmp_path):
  tok = tokenizers.load(_hf_tokenizer(tmp_path / "tokenizer.json", kind="word"))
  assert tok.eos_id == tok._tok.token_to_id("<|endoftext|>")
  for doc in ["the cat sat on the mat", "naïve café 日本", "the unknownword cat"]:
    ids, nbytes = tokenizers.document_arrays(tok, doc)
    assert nbytes.sum() == len(tok.decode(ids).encode()) and nbytes[-1] == 0


def _cfg(tiny_cfg, **overrides):
  return resolved(tiny_cfg, **{
      "data.name": "prepared", "data.tokenizer": "auto", "model.vocab_size": 320, "model.seq_len": 32,
      "train.eval_batches": 2, "train.num_samples": 0, "train.peak_flops": 1.0, **overrides})


def test_evaluate_bits_per_byte_is_total_nats_over_total_bytes(tiny_cfg, corpus, tmp_path):
  _prepare(corpus, tmp_path, validation_every=2)
  cfg = _cfg(tiny_cfg, **{"data.path": str(tmp_path)})
  trainer = trainer_lib.Trainer.create(cfg)
  params = trainer.init_state().params
  out = trainer.evaluate(params)
  stream, key = trainer.stream("validation"), jax.random.key(cfg.seed + 1)
  rows, nbytes = [], 0
  for i in range(2):
    batch = next(stream)
    nbytes += int(batch["target_bytes"][batch["segment_ids"] > 0].sum())  # hand count
    rows.append(trainer.eval_step(params, trainer.to_global(batch), jax.random.fold_in(key, i)))
  assert nbytes == sum(int(r["eval_bytes_sum"]) for r in rows)
  nats = sum(float(r["eval_nats_sum"]) for r in rows)
  np.testing.assert_allclose(out["eval_bpb"], nats / (np.log(2) * nbytes), rtol=1e-6)
  assert not any(k.endswith("_sum") for k in out)
  per_batch = np.mean([float(r["eval_nats_sum"]) / (np.log(2) * int(r["eval_bytes_sum"]))
                       for r in rows])
  assert out["eval_bpb"] != pytest.approx(per_batch, rel=1e-9)  # not a mean of ratios


def test_mixture_is_deterministic_resumable_and_weighted(tiny_cfg, tmp_path):
  """(With grain workers the same pipeline is tested in test_pipeline.py.)"""
  for name, letter in (("a", "a"), ("b", "b")):
    (tmp_path / f"{name}.txt").write_text("\n".join(letter * 5 for _ in range(200)))
    prepared.prepare(prepared.Settings(inputs=(str(tmp_path / f"{name}.txt"),), tokenizer="bytes",
                                       text_unit="line", docs_per_shard=50), str(tmp_path / name))
  mixture = f"{tmp_path / 'a'}:3,{tmp_path / 'b'}:1"
  cfg = _cfg(tiny_cfg, **{"data.mixture": mixture, "train.batch_size": 8})
  source = make_source(cfg)
  open_stream = lambda: source.stream("train", 8, slice(None), 0, 1)
  s1 = open_stream()
  first = [next(s1) for _ in range(3)]
  state = s1.get_state()
  later = [next(s1) for _ in range(3)]
  s2 = open_stream()
  for want in first:
    np.testing.assert_array_equal(next(s2)["inputs"], want["inputs"])
  s3 = open_stream()
  s3.set_state(state)
  for want in later:
    np.testing.assert_array_equal(next(s3)["inputs"], want["inputs"])
  for stream in (s1, s2, s3):
    stream.close()
  tokens = np.concatenate([b["inputs"] for b in first + later])
  a, b = (tokens == ord("a") + text.BYTE_OFFSET).sum(), (tokens == ord("b") + text.BYTE_OFFSET).sum()
  assert 2.2 < a / b < 4.0  # 3:1 by documents (all the same length)
  assert parse_mixture("x:3,y:1") == [("x", 0.75), ("y", 0.25)]
  with pytest.raises(configs.ConfigError, match="data.mixture"):
    parse_mixture("x:3,y")


def test_training_on_hf_prepared_data_checks_tokenizer_and_vocabulary(tiny_cfg, corpus, tmp_path):
  from ftjax import checkpoint, loop
  hf = _hf_tokenizer(tmp_path / "tokenizer.json")
  meta = _prepare(corpus, tmp_path / "data", tokenizer=hf)
  assert meta["tokenizer"]["kind"] == "hf" and meta["tokenizer"]["vocab_size"] == 320
  assert meta["tokenizer"]["eos_id"] == 2  # "</s>", a known end-of-document token
  data = str(tmp_path / "data")
  with pytest.raises(configs.ConfigError, match="model.vocab_size: the tokenizer .* 320 ids"):
    make_source(_cfg(tiny_cfg, **{"data.path": data, "model.vocab_size": 300}))
  with pytest.raises(configs.ConfigError, match="data.tokenizer: 'bytes' is not the tokenizer"):
    make_source(_cfg(tiny_cfg, **{"data.path": data, "data.tokenizer": "bytes"}))
  with pytest.raises(configs.ConfigError, match="data.path: no prepared data.*launch.prepare_data"):
    make_source(_cfg(tiny_cfg))
  cfg = _cfg(tiny_cfg, **{"data.path": data, "data.tokenizer": hf, "train.steps": 2,
                          "train.eval_every": 2, "train.eval_batches": 1})  # its split: 50 tokens
  loop.train_and_evaluate(cfg, str(tmp_path / "run"), log=lambda *_: None)
  assert (tmp_path / "run" / tokenizers.HF_FILE).exists()
  trainer, _ = load_run(str(tmp_path / "run"))
  assert trainer.source.tokenizer.path == str(tmp_path / "run" / tokenizers.HF_FILE)
  assert trainer.source.decode(trainer.source.encode("héllo wörld")) == "héllo wörld"
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert any("eval_bpb" in r and r["eval_bpb"] > 0 for r in rows)
  # The run's copy of its tokenizer is covered by run_checksums.json: a changed byte is refused
  # by sampling/evaluation and by a resumed training run, before the tokenizer is used.
  saved = tmp_path / "run" / tokenizers.HF_FILE
  saved.write_bytes(saved.read_bytes().replace(b'"</s>"', b'"</t>"', 1))
  for load in (lambda: load_run(str(tmp_path / "run")),
               lambda: loop.train_and_evaluate(cfg, str(tmp_path / "run"), log=print)):
    with pytest.raises(checkpoint.CheckpointError, match=r"tokenizer.json is damaged"):
      load()


def test_large_configs_train_on_prepared_data_and_say_how_to_make_it(tmp_path):
  from experiments import ft_1p5b, ft_8b
  for module in (ft_1p5b, ft_8b):
    cfg = configs.resolve(module.get_config())  # resolves (and dry-runs) without data
    assert cfg.data.name == "prepared" and cfg.data.tokenizer == "auto" and not cfg.data.path
  result = subprocess.run([sys.executable, "-m", "launch.train", "--config=experiments/ft_8b.py",
                           f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "data.path" in lines[0] and "launch.prepare_data" in lines[0]


def test_packed_documents_score_as_if_alone_through_the_pipeline(tiny_cfg):
  """The data side's segment ids and positions, fed to the model: a document's per-token loss
  in a packed row equals its loss in a row of its own (baseline decoder)."""
  from ftjax import train
  from ftjax.model import make_model
  cfg = resolved(tiny_cfg, **{"data.name": "shakespeare", "model.latent.enabled": False,
                              "model.vocab_size": 264,
                              "model.seq_len": 32})
  model = make_model(cfg.model)
  params = train.init_params(model, 0)
  tok = tokenizers.ByteTokenizer()
  docs = ["first doc", "the second", "third one"]  # 31 tokens: all fit in a row of 33
  packed = next(pipeline.batches(
      [{"d": d} for d in docs], lambda ex: dict(zip(("tokens", "nbytes"),
                                                    tokenizers.document_arrays(tok, ex["d"]))),
      seed=0, seq_len=32, batch_size=1, repeat=False))

  nll_BT = jax.jit(lambda batch: train._nll(model, params, batch, "zero", None)[0])
  nll = lambda batch: np.asarray(nll_BT({k: np.asarray(v) for k, v in batch.items()}))[0]

  seg = packed["segment_ids"][0]
  for s in (2, 3):  # every segment but the first starts at the previous document's EOS
    where = np.flatnonzero(seg == s)
    n = len(where)
    alone = {k: np.zeros((1, 32), np.int32) for k in packed}  # [EOS, doc] alone, then padding
    alone["inputs"][0, :n] = packed["inputs"][0, where]
    alone["targets"][0, :n] = packed["targets"][0, where]
    alone["segment_ids"][0, :n] = 1
    alone["positions"][0, :n] = np.arange(n)
    assert alone["inputs"][0, 0] == text.EOS and alone["targets"][0, n - 1] == text.EOS
    np.testing.assert_allclose(nll(alone)[:n], nll(packed)[where], rtol=1e-5, atol=1e-5)
    assert not np.allclose(nll(packed)[where[:3]], nll(_unsegmented(packed))[where[:3]])


def _unsegmented(batch):  # the same row with the document boundaries dropped
  return {"inputs": batch["inputs"], "targets": batch["targets"]}
