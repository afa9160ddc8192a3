"""GPU check: the baseline and the Free Transformer (H=16) at the 1.5B shape, bf16, seq 4096.

  python -m benchmarks.gpu_check [--batch=4] [--layers=0] [--remat=dots_no_batch] [--steps=5]
      [--attention=auto] [--out=gpu_check.json] [--norecord]

Prints, for each model: compile time, step time (median, min–max), tokens/s, MFU against the
device's dense bf16 peak (a table of known devices) and against a bf16 matmul measured in the
same run, the FT/baseline time next to the analytic FLOP ratio, the peak device memory next to
XLA's compile-time prediction (`memory_analysis`, what `launch.dryrun` reports) and the attention
implementation used. Each model runs in its own process, so its peak memory is its own. Appends
the table to benchmarks/RESULTS.md. `--layers` > 0 replaces the 24 layers of experiments/ft_1p5b.py.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step (x 4096 tokens).")
_LAYERS = flags.DEFINE_integer("layers", 0, "Decoder layers (0: the config's 24).")
_REMAT = flags.DEFINE_string("remat", "dots_no_batch", "model.remat_policy.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after 2 warm-up steps).")
_ATTENTION = flags.DEFINE_string("attention", "auto", "model.attention_impl.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Tokens per sequence.")
_OUT = flags.DEFINE_string("out", "", "Also write the results as JSON here.")
_RECORD = flags.DEFINE_bool("record", True, "Append the table to benchmarks/RESULTS.md.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "Extra config overrides key=value, e.g. "
                                        "model.d_model=256 (a CPU smoke test of the script).")
_WORKER = flags.DEFINE_string("worker", "", "Internal: run one part (matmul|baseline|ft) in this "
                              "process and print JSON.")

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by device-kind substring, most specific first.
KNOWN_PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
               ("H800", 989e12), ("A100", 312e12), ("L40S", 362e12), ("B200", 2250e12))


def known_peak(device_kind):
  return next((peak for name, peak in KNOWN_PEAKS if name in device_kind), None)


def model_config(latent):
  from experiments import ft_1p5b
  from ftjax.configs import resolve, with_overrides
  overrides = {"data.name": "shakespeare", "data.tokenizer": "bytes",  # data is never read
               "model.latent.enabled": latent, "model.remat_policy": _REMAT.value,
               "model.attention_impl": _ATTENTION.value, "model.seq_len": _SEQ_LEN.value,
               "train.batch_size": _BATCH.value, "train.grad_accum_steps": 1,
               "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
               "mesh.max_replicated_fraction": 1.0}
  if _LAYERS.value:
    overrides["model.num_layers"] = _LAYERS.value
  for item in _OVERRIDES.value:
    key, _, value = item.partition("=")
    overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tf\"" else value
  return resolve(with_overrides(ft_1p5b.get_config(), overrides))


def run_worker(name):
  """Measures the matmul peak, or compiles and times one model, on the first device; prints one
  JSON line."""
  import time

  import jax
  import jax.numpy as jnp

  from benchmarks.common import time_calls
  from ftjax import layers, metrics, sharding, train

  if name == "matmul":
    print(json.dumps({"device_kind": jax.devices()[0].device_kind,
                      "matmul_peak": metrics.measure_matmul_peak(jnp.bfloat16, 8192, 10),
                      "attention_max_err": attention_errors()}))
    return

  cfg = model_config(name == "ft")
  dev = jax.devices()[0]
  mesh = sharding.make_mesh(cfg.mesh, [dev])
  _, state_sh, init, step = train.compile_ready_steps(cfg, mesh)
  shape = (cfg.train.batch_size, cfg.model.seq_len)
  with sharding.in_mesh(mesh):
    state = init()
    tokens = jax.random.randint(jax.random.key(1), (shape[0], shape[1] + 1), 3,
                                cfg.model.vocab_size)
    batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                           sharding.batch_sharding(mesh))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    predicted = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                 - mem.alias_size_in_bytes)

    def one_step():
      nonlocal state
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      return m

    for _ in range(2):
      m = one_step()
    median, lo, hi = time_calls(one_step, _STEPS.value)
    loss = float(one_step()["loss"])
  stats = dev.memory_stats() or {}
  tokens_per_step = shape[0] * shape[1]
  print(json.dumps({
      "model": name, "device_kind": dev.device_kind, "layers": cfg.model.num_layers,
      "params": metrics.count_params(state.params), "tokens_per_step": tokens_per_step,
      "attention": layers.resolve_attention_impl(cfg.model.attention_impl,
                                                 jnp.dtype(cfg.model.dtype), cfg.model.head_dim),
      "remat": cfg.model.remat_policy, "compile_s": compile_s, "step_s": median,
      "step_s_min": lo, "step_s_max": hi, "loss": loss,
      "flops_per_token": metrics.flops_per_token(cfg.model),
      "predicted_bytes": predicted, "peak_bytes": stats.get("peak_bytes_in_use"),
      "bytes_limit": stats.get("bytes_limit")}))


def attention_errors():
  """{case: max |cuDNN − XLA| over the output and the q/k/v gradients} in bfloat16 at the 1.5B
  head shape (GQA 16/8 heads of 128), causal, non-causal and packed; {} without a GPU."""
  import jax
  import jax.numpy as jnp

  from ftjax import layers
  if jax.default_backend() != "gpu":
    return {}
  b, t, k, g, e = 2, 1024, 8, 2, 128
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, t, k, g, e), jnp.bfloat16)
  kv = [jax.random.normal(x, (b, t, k, e), jnp.bfloat16) for x in keys[1:]]
  segments = jnp.concatenate([jnp.ones((b, 300), jnp.int32), jnp.full((b, t - 300), 2)], 1)
  spans = {"causal": (True, layers.Span.full(b)), "full": (False, layers.Span.full(b)),
           "packed_causal": (True, layers.Span(jnp.zeros((), jnp.int32), jnp.zeros((b,), jnp.int32),
                                               segments, None, left_padded=False))}
  errors = {}
  for case, (causal, span) in spans.items():
    def loss(impl, q, k, v):
      out = layers.attend(q, k, v, causal=causal, span=span, impl=impl).astype(jnp.float32)
      return jnp.sum(out * jnp.cos(out)), out
    try:
      results = [jax.jit(jax.value_and_grad(lambda *a, i=impl: loss(i, *a), argnums=(0, 1, 2),
                                            has_aux=True))(q, *kv) for impl in ("xla", "cudnn")]
    except Exception as e:  # noqa: BLE001 (report a kernel that refuses the case, go on)
      errors[case] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      continue
    (_, out_x), grads_x = results[0]
    (_, out_c), grads_c = results[1]
    diffs = [jnp.max(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32)))
             for a, c in zip((out_x, *grads_x), (out_c, *grads_c))]
    errors[case] = float(max(diffs))
  return errors


def run_part(name):
  """One part in its own process (so that each model's peak memory is its own)."""
  cmd = [sys.executable, "-m", "benchmarks.gpu_check", f"--worker={name}"]
  cmd += [f"--{f.name}={f.value}" for f in (_BATCH, _LAYERS, _REMAT, _STEPS, _ATTENTION, _SEQ_LEN)]
  cmd += [f"--override={o}" for o in _OVERRIDES.value]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    print(f"{name}: failed (exit {proc.returncode}):\n  " + "\n  ".join(tail))
    return None
  return json.loads(lines[-1])


def main(argv):
  del argv
  if _WORKER.value:
    run_worker(_WORKER.value)
    return
  from benchmarks import common

  device = run_part("matmul")
  if device is None:
    sys.exit(1)
  kind, matmul_peak = device["device_kind"], device["matmul_peak"]
  print(f"cuDNN vs XLA attention, max abs difference (bf16; output and gradients): "
        f"{device['attention_max_err']}", flush=True)
  table_peak = known_peak(kind)
  print(f"{kind}: measured bf16 matmul {matmul_peak / 1e12:.0f} TFLOP/s; "
        f"table peak {table_peak / 1e12 if table_peak else float('nan'):.0f} TFLOP/s", flush=True)
  results = {}
  for name in ("baseline", "ft"):
    results[name] = run_part(name)
    print(f"{name}: {results[name]}", flush=True)
  rows = []
  for name, r in results.items():
    if r is None:
      rows.append([name] + ["failed"] + [""] * 9)
      continue
    tokens_per_s = r["tokens_per_step"] / r["step_s"]
    flops_per_s = tokens_per_s * r["flops_per_token"]
    peak_gb = (r["peak_bytes"] or 0) / 1e9
    pred_gb = r["predicted_bytes"] / 1e9
    r.update(tokens_per_s=tokens_per_s,
             mfu_table=flops_per_s / table_peak if table_peak else None,
             mfu_matmul=flops_per_s / matmul_peak)
    rows.append([
        name, f"{r['params'] / 1e9:.2f}B / {r['layers']}", f"{r['tokens_per_step']:,}",
        r["attention"], f"{r['compile_s']:.0f}",
        f"{r['step_s']:.3f} ({r['step_s_min']:.3f}–{r['step_s_max']:.3f})",
        f"{tokens_per_s:,.0f}",
        f"{100 * r['mfu_table']:.1f}%" if r["mfu_table"] else "n/a",
        f"{100 * r['mfu_matmul']:.1f}%",
        f"{peak_gb:.1f} / {pred_gb:.1f} ({peak_gb / pred_gb:.2f})" if peak_gb else "n/a",
        f"{r['loss']:.3f}"])
  header = ["model", "params / layers", "tokens/step", "attention", "compile s",
            "step s median (min–max)", "tokens/s", "MFU (table peak)", "MFU (matmul)",
            "peak / predicted GB (ratio)", "loss"]
  base, ft = results["baseline"], results["ft"]
  notes = (f"Device: {kind}; bf16 compute, float32 parameters and Adam "
           f"moments, remat {_REMAT.value}, seq {_SEQ_LEN.value}, {_STEPS.value} timed steps after "
           f"2 warm-up steps. Measured bf16 matmul (8192³): {matmul_peak / 1e12:.0f} TFLOP/s; "
           f"table peak: {table_peak / 1e12 if table_peak else float('nan'):.0f} TFLOP/s. MFU "
           "counts the analytic FLOPs (ftjax.metrics.flops_per_token), not rematerialised ones. "
           "Predicted memory: XLA's memory_analysis of the compiled step on this device.")
  if base and ft:
    measured = ft["step_s"] / base["step_s"]
    analytic = ft["flops_per_token"] / base["flops_per_token"]
    notes += (f"\n\nFT/baseline step time {measured:.3f} vs analytic FLOP ratio {analytic:.3f} "
              f"(difference {100 * (measured - analytic):+.1f} points).")
    results["ft_over_baseline"] = {"measured": measured, "analytic": analytic}
  table = common.markdown_table(header, rows)
  notes += f"\n\ncuDNN vs XLA attention, max abs difference in bf16: {device['attention_max_err']}"
  results.update(device_kind=kind, matmul_peak=matmul_peak, table_peak=table_peak,
                 attention_max_err=device["attention_max_err"],
                 overrides=_OVERRIDES.value)
  if _RECORD.value:
    common.record("GPU check: 1.5B shape, baseline vs FT (H=16)", table, notes)
  else:
    print(table + "\n\n" + notes)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
