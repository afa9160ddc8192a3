"""Where the train step's time goes: an XLA profile of a few steps, summed by kind of op.

  python -m benchmarks.profile_step [--size=small] [--num_bits=0] [--steps=3]

Traces `steps` train steps with jax.profiler (Perfetto trace) and sums the durations of the
compiled program's ops by kind (the op name without its numeric suffix): dot kernels (`dot`,
`*nn_fusion` library calls), layout copies and transposes (`copy*`), elementwise fusions, and
the scan's buffer updates. --num_bits=0 profiles the baseline.
"""

import collections
import glob
import gzip
import json
import re
import tempfile

import jax
from absl import app, flags

from benchmarks import common

_SIZE = flags.DEFINE_string("size", "small", f"Among {list(common.SIZES)}.")
_BITS = flags.DEFINE_integer("num_bits", 0, "H of the FT (0: the baseline).")
_STEPS = flags.DEFINE_integer("steps", 3, "Steps traced (after two untraced).")
_TOP = flags.DEFINE_integer("top", 12, "Kinds of op listed.")


def op_kinds(trace_path, steps):
  """{op kind: ms per step} of the compiled program's ops in a Perfetto trace."""
  with gzip.open(trace_path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  kinds = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if (e.get("ph") != "X" or name.startswith(("$", "while", "PjitFunction")) or "Thunk" in name
        or "ThreadPool" in name):
      continue  # Python frames, executor and thread-pool spans, loop bodies (their ops count)
    kinds[re.sub(r"\.\d+$", "", name)] += e.get("dur", 0) / 1e3 / steps
  return kinds


def main(argv):
  del argv
  cfg = common.size_config(_SIZE.value, _BITS.value > 0, _BITS.value or 16)
  step = common.train_step_fn(cfg)
  step()
  step()
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      wall = common.time_calls(step, _STEPS.value)[0]
    kinds = op_kinds(glob.glob(f"{logdir}/**/perfetto_trace.json.gz", recursive=True)[0],
                     _STEPS.value)
  total = sum(kinds.values())
  groups = collections.Counter()
  for kind, ms in kinds.items():
    groups["dot kernels" if kind == "dot" or kind.endswith("nn_fusion") else
           "copies / transposes" if kind.startswith("copy") or kind.startswith("transpose") else
           "scan buffers (dynamic slices, broadcasts)" if "dynamic" in kind or "broadcast" in kind
           else "other fusions (elementwise, reductions)"] += ms
  rows = [[g, f"{ms:.1f}", f"{100 * ms / total:.1f}%"] for g, ms in groups.most_common()]
  rows += [[f"`{k}`", f"{ms:.1f}", f"{100 * ms / total:.1f}%"]
           for k, ms in kinds.most_common(_TOP.value)]
  model = f"FT H={_BITS.value}" if _BITS.value else "baseline"
  common.record(f"Profile of the train step, {model}, {_SIZE.value}",
                common.markdown_table(["op kind", "ms per step", "share of op time"], rows),
                f"Wall time per traced step {wall * 1e3:.0f} ms; op time summed over both "
                f"threads {total:.0f} ms. First rows: groups; then the largest kinds.")


if __name__ == "__main__":
  app.run(main)
