"""Compile the real train step ahead of time on simulated devices and report memory and FLOPs.

  python -m launch.dryrun --config=experiments/ft_8b.py --num_devices=256 \
      [--mesh=data=1,fsdp=256,tensor=1] [--hbm_gb=80] [--config.model.remat_policy=full]

No parameter is allocated: shapes come from jax.eval_shape and the step is lowered and compiled
for a mesh of `num_devices` fake CPU devices. Prints a table (and --json a JSON line) with the
per-device bytes of arguments, outputs and temporaries, and exits 1 when the total per device
exceeds --hbm_gb; it then compiles candidates and names the smallest train.grad_accum_steps (and,
if needed, remat_policy=full) that fits.
"""

import json
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from ftjax.configs import resolve
from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Simulated devices.", lower_bound=1)
_MESH = flags.DEFINE_string("mesh", "", "Mesh sizes, e.g. data=2,fsdp=64,tensor=2 (overrides "
                            "the config's mesh.*).")
_HBM_GB = flags.DEFINE_float("hbm_gb", 80.0, "Memory per device to check the total against.",
                             lower_bound=1e-3)
_JSON = flags.DEFINE_bool("json", False, "Also print the report as one JSON line.")
_SEARCH = flags.DEFINE_bool("search", True, "When the config does not fit, compile candidates and "
                            "name the smallest train.grad_accum_steps (then remat_policy=full) "
                            "that fits.")

GB = 1e9


def _apply_mesh(cfg, text):
  if not text:
    return cfg
  cfg = cfg.copy_and_resolve_references()
  cfg.unlock()
  cfg.mesh.update(cli.parse_mesh(text))
  return cfg


def dry_run(cfg, num_devices):
  """The report dict for `cfg` compiled on `num_devices` devices (jax must see that many)."""
  import jax
  import jax.numpy as jnp

  from ftjax import metrics, sharding, train

  devices = jax.devices()[:num_devices]
  mesh = sharding.make_mesh(cfg.mesh, devices)
  _, state_sh, init, step = train.compile_ready_steps(cfg, mesh)
  with sharding.in_mesh(mesh):
    abstract_state = jax.eval_shape(init)  # carries the init's out_shardings
    shape = (cfg.train.batch_size, cfg.model.seq_len)
    batch_sh = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
             for k in ("inputs", "targets")}
    compiled = step.lower(abstract_state, batch).compile()
  mem = compiled.memory_analysis()
  args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
  total = args + out + temp - alias
  tokens = shape[0] * shape[1]
  fpt = metrics.flops_per_token(cfg.model)
  params = metrics.count_params(abstract_state.params)
  return {
      "config_params": params, "num_devices": num_devices,
      "mesh": dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, num_devices))),
      "remat_policy": cfg.model.remat_policy, "dtype": cfg.model.dtype,
      "param_dtype": cfg.model.param_dtype, "grad_accum_steps": cfg.train.grad_accum_steps,
      "global_batch_tokens": tokens,
      "replicated_param_fraction": sharding.replicated_fraction(abstract_state.params,
                                                                state_sh.params),
      "per_device_gb": {"arguments": args / GB, "outputs": out / GB, "temporaries": temp / GB,
                        "aliased": alias / GB, "total": total / GB},
      "flops_per_token": fpt, "flops_per_step": fpt * tokens,
      "flops_per_step_per_device": fpt * tokens / num_devices,
  }


def format_report(r, hbm_gb):
  gb = r["per_device_gb"]
  fits = gb["total"] <= hbm_gb
  lines = [
      f"parameters            {r['config_params']:,}",
      f"devices / mesh        {r['num_devices']} / {r['mesh']}",
      f"remat / dtype         {r['remat_policy']} / {r['dtype']} (parameters {r['param_dtype']})",
      f"global batch          {r['global_batch_tokens']:,} tokens in {r['grad_accum_steps']} "
      "microbatch(es)",
      f"replicated params     {100 * r['replicated_param_fraction']:.2f}% of bytes",
      f"per device: args      {gb['arguments']:.2f} GB",
      f"per device: outputs   {gb['outputs']:.2f} GB (aliased with args: {gb['aliased']:.2f} GB)",
      f"per device: temps     {gb['temporaries']:.2f} GB",
      f"per device: total     {gb['total']:.2f} GB of {hbm_gb:g} GB -> "
      f"{'fits' if fits else 'DOES NOT FIT'}",
      f"FLOPs per token       {r['flops_per_token'] / 1e9:.2f} GFLOP",
      f"FLOPs per step        {r['flops_per_step'] / 1e15:.2f} PFLOP "
      f"({r['flops_per_step_per_device'] / 1e12:.1f} TFLOP per device)",
  ]
  return "\n".join(lines), fits


def _with(cfg, **overrides):
  from ftjax.configs import with_overrides
  return resolve(with_overrides(cfg, overrides))


def fit_search(cfg, num_devices, hbm_gb, log=print):
  """(overrides, report) of the cheapest variant of `cfg` that fits `hbm_gb` per device: the
  smallest power-of-two `train.grad_accum_steps` (binary search: memory falls as microbatches
  shrink) with the config's remat policy, then with remat_policy="full"; None when none fits."""
  from ftjax import sharding
  data, fsdp, _ = sharding.mesh_shape(cfg.mesh, num_devices)
  rows = cfg.train.batch_size // (data * fsdp)  # batch rows per data-parallel replica
  accums = [a for a in (2**i for i in range(rows.bit_length())) if rows % a == 0
            and a > cfg.train.grad_accum_steps]
  policies = [cfg.model.remat_policy] + (["full"] if cfg.model.remat_policy != "full" else [])
  for policy in policies:
    fits_at = {}

    def fits(accum):
      variant = {"train.grad_accum_steps": accum, "model.remat_policy": policy}
      report = dry_run(_with(cfg, **variant), num_devices)
      total = report["per_device_gb"]["total"]
      log(f"  grad_accum_steps={accum}, remat_policy={policy}: {total:.2f} GB per device")
      fits_at[accum] = (variant, report)
      return total <= hbm_gb

    lo, hi = 0, len(accums) - 1
    if not accums or not fits(accums[hi]):
      continue
    while lo < hi:  # invariant: accums[hi] fits
      mid = (lo + hi) // 2
      if fits(accums[mid]):
        hi = mid
      else:
        lo = mid + 1
    return fits_at[accums[hi]]
  return None


def main(argv):
  cli.no_extra_args(argv)
  cfg = cli.resolved_config(_CONFIG)
  cfg = resolve(_apply_mesh(cfg, _MESH.value))
  logging.set_verbosity(logging.WARNING)
  import jax
  if len(jax.devices()) < _NUM_DEVICES.value:
    cli.fail(f"flag error: jax sees {len(jax.devices())} devices, fewer than --num_devices")
  report = dry_run(cfg, _NUM_DEVICES.value)
  text, fits = format_report(report, _HBM_GB.value)
  print(text)
  found = None
  if not fits and _SEARCH.value:
    print(f"searching for a variant that fits {_HBM_GB.value:g} GB:")
    found = fit_search(cfg, _NUM_DEVICES.value, _HBM_GB.value)
    if found is None:
      print("no gradient accumulation or remat policy fits: use more devices, a larger "
            "mesh.fsdp, or a smaller batch")
    else:
      overrides, found_report = found
      flags_ = " ".join(f"--config.{k}={v}" for k, v in overrides.items())
      print(f"fits with {flags_}: {found_report['per_device_gb']['total']:.2f} GB per device")
  if _JSON.value:
    out = {**report, "hbm_gb": _HBM_GB.value, "fits": fits}
    if found is not None:
      out["fits_with"] = {"overrides": found[0], "per_device_gb": found[1]["per_device_gb"]}
    print(json.dumps(out))
  sys.exit(0 if fits else 1)


def _simulate_devices(argv):
  """Sets the fake CPU device count before jax is imported (the flag is read from argv)."""
  for arg in argv:
    if arg.startswith("--num_devices="):
      count = arg.split("=", 1)[1]
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={count}").strip()
      os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
  _simulate_devices(sys.argv)
  cli.run(main)
