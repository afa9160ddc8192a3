"""Step time of one model under the performance knobs, each against the default in the same run.

  python -m benchmarks.knobs [--size=medium] [--num_bits=16] [--repeats=5]

Knobs: remat policy, compute dtype, query-chunked attention, the binary mapper's backward chunk,
chunked CE. Each variant changes one setting of the Free Transformer at `size`; the default is
timed first and last so that drift in the machine shows.
"""

from absl import app, flags

from benchmarks import common

_SIZE = flags.DEFINE_string("size", "medium", f"Among {list(common.SIZES)}.")
_BITS = flags.DEFINE_integer("num_bits", 16, "H.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per variant (after one warm-up).")

VARIANTS = [  # (name, {dotted config key: value})
    ("default", {}),
    ("remat dots", {"model.remat_policy": "dots"}),
    ("remat full", {"model.remat_policy": "full"}),
    ("bfloat16", {"model.dtype": "bfloat16"}),
    ("attention query chunk 64", {"model.attention_q_chunk": 64}),
    ("mapper chunk 64", {"model.latent.chunk_tokens": 64}),
    ("mapper chunk 1024", {"model.latent.chunk_tokens": 1024}),
    ("CE chunk 512", {"model.ce_chunk_tokens": 512}),
    ("default (again)", {}),
]


def variant_config(overrides):
  cfg = common.size_config(_SIZE.value, True, _BITS.value).copy_and_resolve_references()
  cfg.unlock()
  for key, value in overrides.items():
    node = cfg
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return cfg


def main(argv):
  del argv
  rows, base = [], None
  for name, overrides in VARIANTS:
    step = common.train_step_fn(variant_config(overrides))
    step()  # compile
    med, lo, hi = common.time_calls(step, _REPEATS.value)
    base = base or med
    rows.append([name, f"{med * 1e3:.0f}", f"{lo * 1e3:.0f}–{hi * 1e3:.0f}", f"{med / base:.3f}"])
  layers, d, _, _, _, batch, seq = common.SIZES[_SIZE.value]
  common.record(f"Performance knobs, FT H={_BITS.value}, {_SIZE.value} (L={layers}, D={d}, "
                f"{batch}×{seq} tokens)",
                common.markdown_table(["variant", "step ms (median)", "min–max", "vs default"],
                                      rows),
                f"{_REPEATS.value} timed steps per variant.")


if __name__ == "__main__":
  app.run(main)
