"""grain input pipeline: shuffle documents, tokenise, pack into fixed-length rows, batch.

    source → shuffle(seed) → repeat → this process's shard → document arrays (ids + end of
    document, bytes per id) → [mix several sources by weight] → pack (concatenate, split every
    T+1 tokens) → batch → prefetch in worker processes

Each batch is a dict of (B, T) arrays:
  inputs, targets   int32 token ids (targets = inputs shifted by one);
  segment_ids       int32: 1, 2, ... for the documents of a row, 0 for padding;
  positions         int32: position within its document, from 0;
  target_bytes      int32: UTF-8 bytes the target token decodes to (0 for the end-of-document
                    token and for padding).
A position's segment and position are those of its *target*: a document's last token predicts
its end-of-document token inside the document, and that end-of-document token, as an input, opens
the next document's segment at position 0 (it is the next document's start token, attending to
nothing before it). So every token of a document, its end token included, is a target within
its own segment, and every scored position has segment id > 0. A document cut by the end of a
row continues in the next row, its positions there counting from 0 again (RoPE sees relative
positions only). Packing concatenates without gaps, so padding (segment 0) appears only at the
end of a stream that does not repeat.

Same seed → same batches. The iterator's state (`get_state`/`set_state`, a JSON-able dict) is
saved with the checkpoints, so a resumed run reads exactly the batches that would have come next,
with or without worker processes (with the same worker count).
"""

import grain
import numpy as np
from absl import flags

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "target_bytes")


def documents(data_source, to_arrays, *, seed, shard_index=0, shard_count=1, repeat=True):
  """A grain MapDataset of {'tokens', 'nbytes'} documents: `to_arrays(example)` gives them."""
  ds = grain.MapDataset.source(data_source).seed(seed).shuffle()
  if repeat:
    ds = ds.repeat()
  ds = ds[shard_index::shard_count]
  return ds.map(to_arrays)


def mix(datasets, weights):
  """Documents drawn from `datasets` in proportion to `weights` (grain's deterministic mixing)."""
  if len(datasets) == 1:
    return datasets[0]
  return grain.MapDataset.mix(list(datasets), weights=list(weights))


def _batch(rows):
  tokens = np.stack([r["tokens"] for r in rows])
  nbytes = np.stack([r["nbytes"] for r in rows])
  segments = np.stack([r["tokens_segment_ids"] for r in rows])
  positions = np.stack([r["tokens_positions"] for r in rows])
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": segments[:, 1:].astype(np.int32),
          "positions": positions[:, 1:].astype(np.int32),
          "target_bytes": nbytes[:, 1:].astype(np.int32)}


def pack_and_batch(docs, *, seq_len, batch_size, worker_count=0):
  """An iterator of batches (see the module docstring) of packed rows of `docs`."""
  packed = grain.experimental.ConcatThenSplitIterDataset(
      docs.to_iter_dataset(), length_struct={"tokens": seq_len + 1, "nbytes": seq_len + 1})
  batched = packed.batch(batch_size, drop_remainder=True, batch_fn=_batch)
  if worker_count:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults are fine)
      flags.FLAGS.mark_as_parsed()
    batched = batched.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(batched)


def batches(data_source, to_arrays, *, seed, seq_len, batch_size, shard_index=0, shard_count=1,
            worker_count=0, repeat=True):
  """Batches of one source. `shard_index`/`shard_count` split the documents between processes;
  `batch_size` is this process's share of the global batch."""
  docs = documents(data_source, to_arrays, seed=seed, shard_index=shard_index,
                   shard_count=shard_count, repeat=repeat)
  return pack_and_batch(docs, seq_len=seq_len, batch_size=batch_size, worker_count=worker_count)
