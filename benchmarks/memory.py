"""Compiled memory of the train step vs H and vs sequence length, and the peak RSS of a real run.

  python -m benchmarks.memory [--bits=8,12,16,20] [--seq_lens=512,2048,8192] [--rss_steps=30]

Temporaries come from XLA's buffer assignment (`compiled.memory_analysis()`, nothing allocated)
on one CPU device. Against H, the binary mapper's backward is compared at its default chunk and
with one chunk holding every token (what a dense N × 2^H formula would need). Against the
sequence length, plain CE and dense attention are compared with chunked CE and query-chunked
attention. The RSS row runs `launch.train` on the synthetic config in a child process.
"""

import os
import resource
import subprocess
import sys
import tempfile

from absl import app, flags

from benchmarks import common
from ftjax.configs import default_config, resolve
from ftjax.errors import ConfigError
from launch import dryrun

_BITS = flags.DEFINE_list("bits", ["8", "12", "16", "20"], "H values.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["512", "2048", "8192"], "Sequence lengths.")
_RSS_STEPS = flags.DEFINE_integer("rss_steps", 30, "Steps of the real run (0: skip it).")
MB = 1e6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_config(**model):
  c = default_config()
  c.data.name = "shakespeare"  # only for validation: nothing is read
  c.model.update(num_layers=4, d_model=256, num_heads=4, num_kv_heads=2, mlp_dim=768,
                 vocab_size=264, seq_len=256)
  c.model.update(**model)
  c.model.latent.kappa_bits = 0.5
  c.train.batch_size = 8
  return c


def temporaries_mb(c):
  """Compiled temporaries in MB; NaN when the config guards refuse the point."""
  try:
    cfg = resolve(c)
  except ConfigError as e:
    print(f"refused: {e}")
    return float("nan")
  return dryrun.dry_run(cfg, 1)["per_device_gb"]["temporaries"] * 1e9 / MB


def vs_bits():
  rows = []
  for h in map(int, _BITS.value):
    c = base_config()
    c.model.latent.num_bits = h
    tokens = c.train.batch_size * c.model.seq_len
    chunked = temporaries_mb(c)
    c.model.latent.chunk_tokens = tokens
    one_chunk = temporaries_mb(c)
    rows.append([h, f"{2**h:,}", tokens, f"{2**h * c.model.d_model * 4 / MB:.1f}",
                 f"{chunked:.1f}", f"{256 * 2**h * 4 / MB:.1f}", f"{one_chunk:.1f}",
                 f"{tokens * 2**h * 4 / MB:.1f}"])
  return common.markdown_table(
      ["H", "codes", "tokens N", "post-sampler MB", "temps MB, chunk 256",
       "256 × 2^H × 4 B (MB)", "temps MB, one chunk of N", "N × 2^H × 4 B (MB)"], rows)


def vs_seq_len():
  rows = []
  for t in map(int, _SEQ_LENS.value):
    plain = base_config(seq_len=t, vocab_size=32768)
    plain.train.batch_size = 1
    chunked = base_config(seq_len=t, vocab_size=32768, ce_chunk_tokens=512, attention_q_chunk=512)
    chunked.train.batch_size = 1
    rows.append([t, f"{temporaries_mb(plain):.1f}", f"{temporaries_mb(chunked):.1f}",
                 f"{t * 32768 * 4 / MB:.1f}", f"{4 * t * t * 4 / MB:.1f}"])
  return common.markdown_table(
      ["T (B=1, V=32768, H=16)", "temps MB, plain CE + dense attention",
       "temps MB, CE chunk 512 + query chunk 512", "T × V logits × 4 B (MB)",
       "heads × T² scores × 4 B (MB)"], rows)


def peak_rss(steps):
  """Peak resident MB of `launch.train` on the synthetic config for `steps` steps."""
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, "-m", "launch.train", "--config=experiments/synthetic.py",
           f"--workdir={workdir}", f"--config.train.steps={steps}",
           f"--config.train.warmup_steps={min(steps, 10)}", "--config.train.num_samples=0"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
  return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e3  # kB on Linux


def main(argv):
  del argv
  notes = ("Temporaries per device from XLA:CPU buffer assignment (arguments and outputs, i.e. "
           "parameters and optimizer state, excluded). Model: L=4, D=256, 8 × 256 tokens unless "
           "stated.")
  common.record("Train-step memory vs H (binary mapper backward)", vs_bits(), notes)
  common.record("Train-step memory vs sequence length (CE and attention)", vs_seq_len(), notes)
  if _RSS_STEPS.value:
    rss = peak_rss(_RSS_STEPS.value)
    common.record("Peak RSS of a real CPU run",
                  common.markdown_table(["run", "peak RSS MB"],
                                        [[f"experiments/synthetic.py, {_RSS_STEPS.value} steps",
                                          f"{rss:.0f}"]]),
                  "ru_maxrss of the child `launch.train` process (Python, jax, data, "
                  "compiled steps, checkpoints).")


if __name__ == "__main__":
  app.run(main)
