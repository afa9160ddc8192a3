"""Shared benchmark plumbing: timing, the machine header, and appending to RESULTS.md."""

import datetime
import os
import platform
import statistics
import sys
import time

import jax

from ftjax.configs import default_config, resolve

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


SIZES = {  # name: (num_layers, d_model, heads, kv heads, mlp, batch, seq_len)
    "small": (4, 256, 4, 2, 768, 8, 256),
    "medium": (8, 512, 8, 4, 1536, 8, 256),
    "large": (8, 768, 12, 4, 2048, 8, 256),
}


def size_config(size, latent, num_bits=16, dtype="float32"):
  """The resolved config of a benchmark size (byte vocabulary; the data is never read)."""
  layers, d, heads, kv, mlp, batch, seq = SIZES[size]
  c = default_config()
  c.data.name = "shakespeare"
  c.model.update(num_layers=layers, d_model=d, num_heads=heads, num_kv_heads=kv, mlp_dim=mlp,
                 vocab_size=264, seq_len=seq, dtype=dtype)
  c.model.latent.update(enabled=latent, num_bits=num_bits, kappa_bits=0.5)
  c.train.batch_size = batch
  return resolve(c)


def train_step_fn(cfg):
  """A no-argument function running one jitted, donated train step on fixed random tokens."""
  from ftjax.trainer import Trainer
  trainer = Trainer.create(cfg)
  state = trainer.init_state()
  tokens = jax.random.randint(jax.random.key(1), (cfg.train.batch_size, cfg.model.seq_len + 1),
                              3, cfg.model.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  def step():
    nonlocal state
    state, m = trainer.train_step(state, batch)
    jax.block_until_ready(m)

  return step


def time_calls(fn, repeats):
  """Seconds per call of `fn()` (which must block until done): (median, min, max)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times), max(times)


def machine():
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  dev = jax.devices()[0]
  return (f"{dev.platform.upper()} ({dev.device_kind}), {os.cpu_count()} cores, {cpu}; "
          f"jax {jax.__version__}, Python {platform.python_version()}")


def markdown_table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def record(title, table, notes=""):
  """Prints `table` and appends it to RESULTS.md with the date, machine and command."""
  command = "python -m benchmarks." + os.path.basename(sys.argv[0]).removesuffix(".py")
  if sys.argv[1:]:
    command += " " + " ".join(sys.argv[1:])
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  block = f"\n## {title}\n\n{stamp} · {machine()}\n\n`{command}`\n\n{table}\n"
  if notes:
    block += f"\n{notes}\n"
  print(block)
  with open(RESULTS, "a", encoding="utf-8") as f:
    f.write(block)
