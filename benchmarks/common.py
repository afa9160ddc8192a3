"""Shared benchmark plumbing: timing, the machine header, and appending to RESULTS.md."""

import datetime
import os
import platform
import statistics
import sys
import time

import jax

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


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
