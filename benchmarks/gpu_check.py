"""GPU check: training steps at the 1.5B and 8B shapes, bf16, seq 4096, on one GPU.

  python -m benchmarks.gpu_check [--parts=all|a,b,...] [--batch=4] [--layers=0] [--layers_8b=24]
      [--batch_8b=2] [--remat=dots_no_batch] [--steps=5] [--out=F.json] [--norecord]
      [--override=model.d_model=256 ...]

Parts, in this order (each in its own process, so that a model's peak memory is its own; the
device's kind, versions and a bf16 matmul's FLOP/s are measured first):
  base_unpacked:     1.5B baseline, one document per row (the previous check's figure)
  base_packed:       1.5B baseline, packed rows, attention "auto" (cuDNN's segment offsets)
  base_packed_mask:  the same through cuDNN with a dense (B, 1, T, S) mask (the old path)
  base_packed_pallas: the same through the Pallas GPU flash kernel
  base_fp8:          1.5B baseline, unpacked, model.matmul_dtype=fp8 (vs base_unpacked)
  attention:         attention on packed rows at the 1.5B head shape: max |impl − xla| of the
                     output and the q/k/v gradients next to the largest |xla| value, and
                     forward+backward time per impl
  ft_packed:         1.5B FT, packed
  b8_packed, ft8_packed: the 8B shape's baseline and FT with --layers_8b of its 32 layers, packed

Per model: compile time, step time (median, min–max), tokens/s, MFU against the device's dense
bf16 peak (a table of known devices) and against the measured matmul, FT/baseline next to the
analytic FLOP ratio, peak memory next to XLA's compile-time prediction (`memory_analysis`), the
loss after the steps (all runs train on one fixed batch from one init, so losses compare), and
the FP8 matmuls in the compiled step. Appends the table to benchmarks/RESULTS.md; --out is
rewritten after every part. Estimated at about 6 minutes on an H200 (not yet run there).

The 8B default, 24 of 32 layers at 2 × 4096 tokens, comes from a count, not a GPU compile: 16
bytes per parameter (float32 weights, Adam moments, gradients) and about 0.84 GB of saved
activations per layer give about 124 GB for the baseline and 133 GB for the FT (its encoder block
and the 2^16 × 4096 post-sampler) against the 143 GB that XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
leaves (26 layers: about 144 GB for the FT). The same count overstates the 1.5B check's measured
peak (45 vs 42.3 GB). `launch.dryrun` (XLA:CPU) predicts 156 GB for the 24-layer baseline (its
temporaries are XLA:CPU's). An 8B part that runs out of memory is retried once with 4 layers
fewer.
"""

import json
import os
import platform
import subprocess
import sys

from absl import app, flags

_PARTS = flags.DEFINE_string("parts", "all", "Comma-separated parts (see the docstring), or all.")
_BATCH = flags.DEFINE_integer("batch", 4, "1.5B: sequences per step (x seq_len tokens).")
_LAYERS = flags.DEFINE_integer("layers", 0, "1.5B: decoder layers (0: the config's 24).")
_LAYERS_8B = flags.DEFINE_integer("layers_8b", 24, "8B: decoder layers (of the config's 32).")
_BATCH_8B = flags.DEFINE_integer("batch_8b", 2, "8B: sequences per step.")
_REMAT = flags.DEFINE_string("remat", "dots_no_batch", "model.remat_policy.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after 2 warm-up steps).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Tokens per sequence.")
_MEAN_DOC = flags.DEFINE_integer("mean_doc", 1024, "Packed rows: mean document length (tokens).")
_OUT = flags.DEFINE_string("out", "", "Also write the results as JSON here.")
_RECORD = flags.DEFINE_bool("record", True, "Append the table to benchmarks/RESULTS.md.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "Extra config overrides key=value, e.g. "
                                        "model.d_model=256 (a CPU smoke test of the script).")
_WORKER = flags.DEFINE_string("worker", "", "Internal: run one part in this process, print JSON.")

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by device-kind substring, most specific first.
KNOWN_PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
               ("H800", 989e12), ("A100", 312e12), ("L40S", 362e12), ("B200", 2250e12))

# part: (shape, latent, packed, attention, matmul_dtype)
MODEL_PARTS = {
    "base_unpacked": ("1p5b", False, False, "auto", "default"),
    "base_packed": ("1p5b", False, True, "auto", "default"),
    "b8_packed": ("8b", False, True, "auto", "default"),
    "ft8_packed": ("8b", True, True, "auto", "default"),
    "base_fp8": ("1p5b", False, False, "auto", "fp8"),
    "base_packed_mask": ("1p5b", False, True, "cudnn_mask", "default"),
    "base_packed_pallas": ("1p5b", False, True, "pallas", "default"),
    "ft_packed": ("1p5b", True, True, "auto", "default"),
}
PARTS = ("base_unpacked", "base_packed", "attention", "b8_packed", "ft8_packed", "base_fp8",
         "base_packed_mask", "base_packed_pallas", "ft_packed")
ATTENTION_IMPLS = ("cudnn", "cudnn_mask", "pallas")  # timed and compared with xla in "device"


def known_peak(device_kind):
  return next((peak for name, peak in KNOWN_PEAKS if name in device_kind), None)


def model_config(part):
  from experiments import ft_1p5b, ft_8b
  from ftjax.configs import resolve, with_overrides
  shape, latent, _, attention, matmul = MODEL_PARTS[part]
  eight = shape == "8b"
  overrides = {"data.name": "shakespeare", "data.tokenizer": "bytes",  # data is never read
               "model.latent.enabled": latent, "model.remat_policy": _REMAT.value,
               "model.attention_impl": attention, "model.matmul_dtype": matmul,
               "model.seq_len": _SEQ_LEN.value,
               "train.batch_size": _BATCH_8B.value if eight else _BATCH.value,
               "train.grad_accum_steps": 1, "train.warmup_steps": 0,  # the loss moves in 8 steps
               "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
               "mesh.max_replicated_fraction": 1.0}
  layers = _LAYERS_8B.value if eight else _LAYERS.value
  if layers:
    overrides["model.num_layers"] = layers
  for item in _OVERRIDES.value:
    key, _, value = item.partition("=")
    overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tf\"" else value
  return resolve(with_overrides((ft_8b if eight else ft_1p5b).get_config(), overrides))


def packed_rows(b, t, mean_doc, seed=0):
  """(segment_ids, positions) (B, T) int32 numpy: documents of geometric lengths (mean
  `mean_doc`, at least 16 tokens) packed back to back, the last one cut at the row's end."""
  import numpy as np
  rng = np.random.default_rng(seed)
  seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  for row in range(b):
    start, doc = 0, 1
    while start < t:
      n = min(max(16, int(rng.geometric(1 / mean_doc))), t - start)
      seg[row, start:start + n], pos[row, start:start + n] = doc, np.arange(n)
      start, doc = start + n, doc + 1
  return seg, pos


def make_batch(cfg, packed):
  import jax
  import numpy as np
  b, t = cfg.train.batch_size, cfg.model.seq_len
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (b, t + 1), 3, cfg.model.vocab_size))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  if packed:
    batch["segment_ids"], batch["positions"] = packed_rows(b, t, _MEAN_DOC.value)
  return batch


def run_model(part):
  """Compiles and times one model on the first device; returns its JSON-ready dict."""
  import time

  import jax
  import jax.numpy as jnp

  from benchmarks.common import time_calls
  from ftjax import layers, metrics, sharding, train

  cfg = model_config(part)
  packed = MODEL_PARTS[part][2]
  dev = jax.devices()[0]
  mesh = sharding.make_mesh(cfg.mesh, [dev])
  _, state_sh, init, step = train.compile_ready_steps(cfg, mesh)
  host_batch = make_batch(cfg, packed)
  with sharding.in_mesh(mesh):
    state = init()
    batch = jax.device_put(host_batch, sharding.batch_sharding(mesh))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    predicted = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                 - mem.alias_size_in_bytes)
    fp8_gemms = compiled.as_text().count("__cublas$lt$matmul$f8")

    def one_step():
      nonlocal state
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      return m

    for _ in range(2):
      one_step()
    median, lo, hi = time_calls(one_step, _STEPS.value)
    loss = float(one_step()["loss"])
  stats = dev.memory_stats() or {}
  segments = host_batch["segment_ids"].max(axis=1) if packed else None
  return {
      "model": part, "device_kind": dev.device_kind, "layers": cfg.model.num_layers,
      "d_model": cfg.model.d_model, "latent": cfg.model.latent.enabled, "packed": packed,
      "docs_per_row": None if segments is None else [int(segments.min()), int(segments.max())],
      "matmul_dtype": cfg.model.matmul_dtype, "fp8_gemms_in_hlo": fp8_gemms,
      "params": metrics.count_params(state.params),
      "tokens_per_step": cfg.train.batch_size * cfg.model.seq_len,
      "attention": layers.resolve_attention_impl(cfg.model.attention_impl,
                                                 jnp.dtype(cfg.model.dtype), cfg.model.head_dim),
      "remat": cfg.model.remat_policy, "compile_s": compile_s, "step_s": median,
      "step_s_min": lo, "step_s_max": hi, "loss_after_steps": loss, "steps_run": _STEPS.value + 3,
      "flops_per_token": metrics.flops_per_token(cfg.model),
      "predicted_bytes": predicted, "peak_bytes": stats.get("peak_bytes_in_use"),
      "bytes_limit": stats.get("bytes_limit")}


def run_device():
  import jax
  import jax.numpy as jnp

  from ftjax import metrics
  return {"device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
          "jax": jax.__version__, "python": platform.python_version(),
          "matmul_peak": metrics.measure_matmul_peak(jnp.bfloat16, 8192, 10)}


def attention_check():
  """{case: {impl: errors and time}} at the 1.5B head shape (GQA 16/8 heads of 128), bf16,
  packed rows (and one unpacked causal case for cuDNN): max |impl − xla| of the output and of
  the q/k/v gradients (a fixed random cotangent), the largest |xla| value of each, and the
  median forward+backward seconds; {} without a GPU."""
  import jax
  import jax.numpy as jnp

  from benchmarks.common import time_calls
  from ftjax import layers
  if jax.default_backend() != "gpu":
    return {}
  b, t, k, g, e = _BATCH.value, _SEQ_LEN.value, 8, 2, 128
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, k, g, e), jnp.bfloat16)
  kv = [jax.random.normal(x, (b, t, k, e), jnp.bfloat16) for x in keys[1:3]]
  ct = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  seg, _ = packed_rows(b, t, _MEAN_DOC.value)
  packed = layers.Span(jnp.zeros((), jnp.int32), jnp.zeros((b,), jnp.int32), jnp.asarray(seg),
                       None, left_padded=False)
  cases = {"packed_causal": (True, packed, ATTENTION_IMPLS),
           "packed_full": (False, packed, ATTENTION_IMPLS),
           "unpacked_causal": (True, layers.Span.full(b), ("cudnn",))}
  results = {}
  for case, (causal, span, impls) in cases.items():
    def fwd_bwd(impl, q, k, v):
      out, vjp = jax.vjp(lambda *a: layers.attend(*a, causal=causal, span=span, impl=impl), q, k, v)
      return (out, *vjp(ct))
    run = {impl: jax.jit(lambda *a, i=impl: fwd_bwd(i, *a)) for impl in ("xla", *impls)}
    ref = [x.astype(jnp.float32) for x in run["xla"](q, *kv)]
    results[case] = {"max_abs_xla": dict(zip(("out", "dq", "dk", "dv"),
                                             (float(jnp.max(jnp.abs(r))) for r in ref)))}
    for impl in ("xla", *impls):
      try:
        got = run[impl](q, *kv)
        seconds = time_calls(lambda: jax.block_until_ready(run[impl](q, *kv)), 5)[0]
      except Exception as exc:  # noqa: BLE001 (report a kernel that refuses the case, go on)
        results[case][impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        continue
      diffs = [float(jnp.max(jnp.abs(x.astype(jnp.float32) - r))) for x, r in zip(got, ref)]
      results[case][impl] = {"seconds": seconds,
                             "max_abs_diff": dict(zip(("out", "dq", "dk", "dv"), diffs))}
  return results


def run_part(part, layers_8b=None):
  """One part in its own process; its JSON dict, or None (the failure printed). An 8B part that
  runs out of memory is retried once with 4 layers fewer."""
  layers_8b = layers_8b or _LAYERS_8B.value
  cmd = [sys.executable, "-m", "benchmarks.gpu_check", f"--worker={part}",
         f"--layers_8b={layers_8b}"]
  cmd += [f"--{f.name}={f.value}" for f in (_BATCH, _LAYERS, _BATCH_8B, _REMAT, _STEPS,
                                            _SEQ_LEN, _MEAN_DOC)]
  cmd += [f"--override={o}" for o in _OVERRIDES.value]
  env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if not proc.returncode and lines:
    return json.loads(lines[-1])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
  print(f"{part}: failed (exit {proc.returncode}):\n  " + "\n  ".join(tail), flush=True)
  if MODEL_PARTS.get(part, ("",))[0] == "8b" and "RESOURCE_EXHAUSTED" in proc.stderr \
      and layers_8b == _LAYERS_8B.value and layers_8b > 4:
    return run_part(part, layers_8b - 4)
  return None


def model_row(r, table_peak, matmul_peak):
  tokens_per_s = r["tokens_per_step"] / r["step_s"]
  flops_per_s = tokens_per_s * r["flops_per_token"]
  r.update(tokens_per_s=tokens_per_s, mfu_table=flops_per_s / table_peak if table_peak else None,
           mfu_matmul=flops_per_s / matmul_peak)
  peak_gb, pred_gb = (r["peak_bytes"] or 0) / 1e9, r["predicted_bytes"] / 1e9
  return [r["model"], f"{r['params'] / 1e9:.2f}B / {r['layers']}", f"{r['tokens_per_step']:,}",
          "packed" if r["packed"] else "one doc", r["attention"], r["matmul_dtype"],
          f"{r['compile_s']:.0f}",
          f"{r['step_s']:.3f} ({r['step_s_min']:.3f}–{r['step_s_max']:.3f})",
          f"{tokens_per_s:,.0f}", f"{100 * r['mfu_table']:.1f}%" if r["mfu_table"] else "n/a",
          f"{100 * r['mfu_matmul']:.1f}%",
          f"{peak_gb:.1f} / {pred_gb:.1f} ({peak_gb / pred_gb:.2f})" if peak_gb else "n/a",
          f"{r['loss_after_steps']:.4f}"]


def ratios(results):
  """The comparisons the check is for, from the parts that ran."""
  out = {}
  step = lambda name: results.get(name) and results[name]["step_s"]
  for name in ("base_packed", "base_packed_mask", "base_packed_pallas"):
    if step(name) and step("base_unpacked"):
      out[f"{name}/base_unpacked step time"] = step(name) / step("base_unpacked")
  if step("base_fp8") and step("base_unpacked"):
    out["base_fp8 tokens/s over base_unpacked"] = step("base_unpacked") / step("base_fp8")
    out["base_fp8 loss − base_unpacked loss"] = (results["base_fp8"]["loss_after_steps"]
                                                 - results["base_unpacked"]["loss_after_steps"])
  for base, ft in (("base_packed", "ft_packed"), ("b8_packed", "ft8_packed")):
    if step(base) and step(ft):
      out[f"{ft}/{base} step time"] = step(ft) / step(base)
      out[f"{ft}/{base} analytic FLOPs"] = (results[ft]["flops_per_token"]
                                            / results[base]["flops_per_token"])
  return out


def write_json(results):
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


def main(argv):
  del argv
  if _WORKER.value:
    run = {"device": run_device, "attention": attention_check}.get(_WORKER.value)
    print(json.dumps(run() if run else run_model(_WORKER.value)))
    return
  from benchmarks import common

  parts = PARTS if _PARTS.value == "all" else _PARTS.value.split(",")
  device = run_part("device")
  if device is None:
    sys.exit(1)
  kind, matmul_peak = device["device_kind"], device["matmul_peak"]
  table_peak = known_peak(kind)
  print(f"{kind}, jax {device['jax']}: bf16 matmul {matmul_peak / 1e12:.0f} TFLOP/s", flush=True)
  results = {"device": device, "overrides": _OVERRIDES.value,
             "command": " ".join(["python -m benchmarks.gpu_check", *sys.argv[1:]])}
  models, rows = {}, []
  for part in parts:
    results[part] = run_part(part)
    print(f"{part}: {json.dumps(results[part])}", flush=True)
    if part in MODEL_PARTS:
      models[part] = results[part]
      if results[part]:
        rows.append(model_row(results[part], table_peak, matmul_peak))
    results["compared"] = ratios(models)
    write_json(results)
  header = ["part", "params / layers", "tokens/step", "rows", "attention", "matmuls", "compile s",
            "step s median (min–max)", "tokens/s", "MFU (table peak)", "MFU (matmul)",
            "peak / predicted GB (ratio)", "loss after steps"]
  notes = (f"Device: {kind}; jax {device['jax']}, Python {device['python']}. bf16 compute, "
           f"float32 parameters and Adam moments, remat {_REMAT.value}, seq {_SEQ_LEN.value}, "
           f"{_STEPS.value} timed steps after 2 warm-up steps, one fixed batch, lr from step 0 "
           f"(no warm-up). Packed rows: documents of geometric length, mean {_MEAN_DOC.value} "
           f"tokens. Measured bf16 matmul (8192³): {matmul_peak / 1e12:.0f} TFLOP/s; table peak: "
           f"{table_peak / 1e12 if table_peak else float('nan'):.0f} TFLOP/s. MFU counts the "
           "analytic FLOPs (ftjax.metrics.flops_per_token: full T×S attention, also for packed "
           "rows), not rematerialised ones. Predicted memory: XLA's memory_analysis of the "
           "compiled step on this device.\n\n"
           + "\n".join(f"- {k}: {v:.3f}" for k, v in results["compared"].items())
           + f"\n\nAttention part: {json.dumps(results.get('attention'))}")
  table = common.markdown_table(header, rows)
  if _RECORD.value:
    common.record("GPU check: packed rows, FP8, the 8B shape", table, notes)
  else:
    print(table + "\n\n" + notes)


if __name__ == "__main__":
  app.run(main)
