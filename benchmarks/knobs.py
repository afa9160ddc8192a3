"""Step time of one model under the performance knobs, each against the default in the same run.

  python -m benchmarks.knobs [--size=small] [--num_bits=16] [--repeats=8]

Knobs: remat policy, compute dtype, query-chunked attention, the binary mapper's backward chunk,
chunked CE. Each variant changes one setting of the Free Transformer at `size`. All variants are
compiled first, then timed in turns (one step each per round, `repeats` rounds), so that a slow
spell of the machine falls on every variant alike.
"""

import statistics

from absl import app, flags

from benchmarks import common
from ftjax.configs import with_overrides

_SIZE = flags.DEFINE_string("size", "small", f"Among {list(common.SIZES)}.")
_BITS = flags.DEFINE_integer("num_bits", 16, "H.")
_REPEATS = flags.DEFINE_integer("repeats", 8, "Rounds (one timed step per variant each).")

VARIANTS = [  # (name, {dotted config key: value})
    ("default", {}),
    ("remat dots", {"model.remat_policy": "dots"}),
    ("remat full", {"model.remat_policy": "full"}),
    ("bfloat16", {"model.dtype": "bfloat16"}),
    ("attention query chunk 64", {"model.attention_q_chunk": 64}),
    ("mapper chunk 64", {"model.latent.chunk_tokens": 64}),
    ("mapper chunk 1024", {"model.latent.chunk_tokens": 1024}),
    ("CE chunk 512", {"model.ce_chunk_tokens": 512}),
]


def variant_config(overrides):
  return with_overrides(common.size_config(_SIZE.value, True, _BITS.value), overrides)


def main(argv):
  del argv
  steps = [common.train_step_fn(variant_config(overrides)) for _, overrides in VARIANTS]
  for step in steps:
    step()  # compile
  times = [[] for _ in steps]
  for _ in range(_REPEATS.value):
    for step, t in zip(steps, times):
      t.append(common.time_calls(step, 1)[0])
  base = statistics.median(times[0])
  rows = [[name, f"{statistics.median(t) * 1e3:.0f}", f"{min(t) * 1e3:.0f}–{max(t) * 1e3:.0f}",
           f"{statistics.median(t) / base:.3f}"] for (name, _), t in zip(VARIANTS, times)]
  layers, d, _, _, _, batch, seq = common.SIZES[_SIZE.value]
  common.record(f"Performance knobs, FT H={_BITS.value}, {_SIZE.value} (L={layers}, D={d}, "
                f"{batch}×{seq} tokens)",
                common.markdown_table(["variant", "step ms (median)", "min–max", "vs default"],
                                      rows),
                f"Median of {_REPEATS.value} rounds; in each round every variant runs one step.")


if __name__ == "__main__":
  app.run(main)
