"""grain input pipeline: shuffle documents, tokenise, pack into fixed-length sequences, batch.

    source → shuffle(seed) → repeat → this process's shard → tokenise + end-of-document token
           → pack (concatenate, split every T+1 tokens) → batch → prefetch in worker processes

Same seed → same batches. The iterator's state (`get_state`/`set_state`, a JSON-able dict) is
saved with the checkpoints, so a resumed run reads exactly the batches that would have come next,
with or without worker processes.
"""

import grain
import numpy as np
from absl import flags

from ftjax.data import corpora


def batches(data_source, encode, *, seed, seq_len, batch_size, shard_index=0, shard_count=1,
            worker_count=0, repeat=True):
  """An iterator of {'tokens': (batch_size, seq_len + 1) int32} over `data_source`.

  `shard_index`/`shard_count` split the documents between processes; `batch_size` is this
  process's share of the global batch.
  """
  ds = grain.MapDataset.source(data_source).seed(seed).shuffle()
  if repeat:
    ds = ds.repeat()
  ds = ds[shard_index::shard_count]
  ds = ds.map(lambda ex: {"tokens": corpora.document_tokens(ex, encode)})
  packed = grain.experimental.ConcatThenSplitIterDataset(
      ds.to_iter_dataset(), length_struct={"tokens": seq_len + 1})
  packed = packed.map(lambda ex: {"tokens": ex["tokens"]})  # drop packing metadata
  batched = packed.batch(batch_size, drop_remainder=True,
                         batch_fn=lambda xs: {"tokens": np.stack([x["tokens"] for x in xs])})
  if worker_count:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults are fine)
      flags.FLAGS.mark_as_parsed()
    batched = batched.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(batched)
