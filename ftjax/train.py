"""The step math: train state, optimizer, loss, jitted train and eval steps, and placing them
on a mesh (`compile_ready_steps`). The loop lives in `ftjax.loop`, the `Trainer` in
`ftjax.trainer`.

Randomness: the key of step s is fold_in(key(seed), s); batch row r draws its latent Z from
fold_in(that key, r), so Z differs per step and row, runs are reproducible, a resumed run draws
the same Z, and gradient accumulation does not change which Z a row gets.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from ftjax import losses, sharding, zdiag
from ftjax.errors import ConfigError
from ftjax.fp8 import fp8_supported
from ftjax.layers import resolve_attention_impl
from ftjax.model import Transformer, make_model, unembed_kernel

LOG2 = math.log(2)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_steps: jax.Array  # steps whose loss or gradients were not finite (update skipped)
  first_nonfinite_step: jax.Array  # the first of them, -1 if none
  # float32 scalars of the KL term, traced (changing κ does not recompile): "kappa" (free bits,
  # nats), "target" (target_rate: nats per token), "beta" (target_rate: the multiplier on the
  # mean KL), "log_beta_i" (its integral term), "kl_ema" (running mean of the batch KL, nats).
  latent_ctl: Any = None


def latent_ctl_init(lat: ConfigDict) -> dict:
  """The KL-term scalars of a fresh run of the resolved `model.latent` config."""
  f = lambda v: jnp.asarray(v, jnp.float32)
  log_beta = math.log(lat.control_beta_init)
  return {"kappa": f(lat.kappa or 0.0), "target": f(target_nats(lat)),
          "beta": f(lat.control_beta_init), "log_beta_i": f(log_beta), "kl_ema": f(0.0)}


def target_nats(lat: ConfigDict) -> float:
  """The target rate in nats per token (`target_bits` converted; 0 without a target): the unit of
  the KL and of the state's "target"."""
  return 0.0 if lat.target_bits is None else lat.target_bits * LOG2


def set_latent_targets(state: "TrainState", lat: ConfigDict,
                       state_sharding: "TrainState") -> "TrainState":
  """`state` with κ and the target rate taken from the config `lat` (placed like the state):
  the config decides them, also on resume and when a compiled step is reused for another κ."""
  ctl = dict(state.latent_ctl)
  for name, value in (("kappa", lat.kappa or 0.0), ("target", target_nats(lat))):
    ctl[name] = jax.device_put(jnp.asarray(value, jnp.float32), state_sharding.latent_ctl[name])
  return state.replace(latent_ctl=ctl)


def lr_schedule(t: ConfigDict) -> optax.Schedule:
  """Linear warm-up to `t.lr`, then cosine decay to `t.lr * t.lr_final_fraction`."""
  return optax.warmup_cosine_decay_schedule(
      0.0, t.lr, max(t.warmup_steps, 1), max(t.steps, t.warmup_steps + 1),
      end_value=t.lr * t.lr_final_fraction)


def _decay_mask(params):
  """Weight decay on matmul kernels and the embedding; not on norms, ζ or the post-sampler
  (whose rows only move when their code is sampled)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key in ("kernel", "embed"), params)


def make_optimizer(t: ConfigDict) -> optax.GradientTransformation:
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  chain.append(optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                           mask=_decay_mask))
  return optax.chain(*chain)


def step_key(seed: int, step: jax.Array) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), step)


def init_variables(model: Transformer, seed: int) -> dict:
  """Variables with their logical-axis metadata (nn.Partitioned boxes)."""
  tokens = jnp.zeros((1, model.cfg.seq_len), jnp.int32)
  return model.init(jax.random.key(seed), tokens, z_mode="encoder", latent_key=jax.random.key(0))


def _cast_floats(tree, dtype):
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def init_params(model: Transformer, seed: int) -> dict:
  """Parameters for `model` in `model.param_dtype`, unboxed from their logical-axis metadata."""
  params = nn.meta.unbox(init_variables(model, seed)["params"])
  return _cast_floats(params, jnp.dtype(model.cfg.param_dtype))


def init_train_state(cfg: ConfigDict, model: Transformer) -> "TrainState":
  """Step 0: fresh parameters; the optimizer state (Adam moments) is float32 whatever the
  parameters' dtype."""
  params = init_params(model, cfg.seed)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=make_optimizer(cfg.train).init(_cast_floats(params, jnp.float32)),
                    nonfinite_steps=jnp.zeros((), jnp.int32),
                    first_nonfinite_step=jnp.full((), -1, jnp.int32),
                    latent_ctl=latent_ctl_init(cfg.model.latent))


def token_mask(batch: dict) -> jax.Array:
  """(B, T) float32: 1 for tokens that count in the loss, 0 for padding (segment id 0 in
  packed batches)."""
  if "segment_ids" in batch:
    return (batch["segment_ids"] > 0).astype(jnp.float32)
  return jnp.ones(batch["targets"].shape, jnp.float32)


def row_keys(key: jax.Array, rows_B: jax.Array) -> jax.Array:
  """One latent key per batch row: a row draws the same Z whatever microbatch it is in."""
  return jax.vmap(lambda r: jax.random.fold_in(key, r))(rows_B)


def _nll(model, params, batch, z_mode, key):
  """Per-token NLL (B, T) and the model's aux for one z_mode."""
  m = model.cfg
  x_BTD, aux = model.apply({"params": params}, batch["inputs"], z_mode=z_mode, latent_key=key,
                           return_hidden=True, segment_ids_BT=batch.get("segment_ids"),
                           positions_BT=batch.get("positions"))
  nll_BT = losses.cross_entropy(x_BTD, unembed_kernel(params, m), batch["targets"],
                                chunk_tokens=m.ce_chunk_tokens, dtype=jnp.dtype(m.dtype))
  return nll_BT, aux


def loss_fn(params, batch, keys_B, model, mask_BT, num_tokens, ctl=None):
  """(Σ_t CE_t + KL term) / num_tokens over the tokens `mask_BT` keeps; returns (loss, metrics).
  The KL term is Σ_t max(0, KL_t − κ) (`kl_control="free_bits"`, κ = ctl["kappa"]) or
  β Σ_t KL_t (`"target_rate"`, β = ctl["beta"], held constant in the gradient). `ctl` is the
  state's `latent_ctl` (None: from the config). Metrics are sums divided by `num_tokens` too, so
  the metrics of the microbatches of one step add up to those of the whole batch."""
  lat = model.cfg.latent
  nll_BT, aux = _nll(model, params, batch, "encoder", keys_B)
  mean = lambda x_BT: jnp.sum(x_BT * mask_BT) / num_tokens
  ce = mean(nll_BT)
  if not lat.enabled:
    return ce, {"loss": ce, "ce": ce}
  ctl = latent_ctl_init(lat) if ctl is None else ctl
  kl_BT = aux["kl_BT"]
  kl = mean(kl_BT)
  if lat.kl_control == "target_rate":
    kl_term = jax.lax.stop_gradient(ctl["beta"]) * kl
    loss = ce + kl_term
    return loss, {"loss": loss, "ce": ce, "kl": kl, "kl_weighted": kl_term}
  kappa = ctl["kappa"]
  kl_clipped = mean(losses.free_bits_kl_BT(kl_BT, kappa))
  loss = ce + kl_clipped
  return loss, {"loss": loss, "ce": ce, "kl": kl, "kl_clipped": kl_clipped,
                "kl_frac_above_kappa": mean((kl_BT > kappa).astype(jnp.float32))}


def update_latent_ctl(ctl, kl, step, lat, start_step):
  """The target-rate controller after a step whose mean KL was `kl` (nats per token).

  A PI controller on log β, GECO-style (multiplicative in β): e = (kl_ema − target) / target
  clipped to [−1, 1],
  integral I ← clip(I + ki·e), log β = clip(I + kp·e), both clipped to [log β_min, log β_max]
  (anti-windup); kl_ema ← ρ·kl_ema + (1 − ρ)·kl. Before `start_step` (the warm-up) β stays at
  its initial value and only kl_ema moves."""
  rho = lat.control_ema
  kl_ema = jnp.where(step == 0, kl, rho * ctl["kl_ema"] + (1 - rho) * kl)
  err = jnp.clip((kl_ema - ctl["target"]) / jnp.maximum(ctl["target"], 1e-6), -1.0, 1.0)
  lo, hi = math.log(lat.control_beta_min), math.log(lat.control_beta_max)
  on = step >= start_step
  integral = jnp.where(on, jnp.clip(ctl["log_beta_i"] + lat.control_ki * err, lo, hi),
                       ctl["log_beta_i"])
  beta = jnp.where(on, jnp.exp(jnp.clip(integral + lat.control_kp * err, lo, hi)), ctl["beta"])
  return {**ctl, "kl_ema": kl_ema, "log_beta_i": integral, "beta": beta}


def accumulated_grads(params, batch, key, model, num_micro, ctl=None):
  """(float32 gradients, metrics) of the token-weighted mean loss of `batch`, computed over
  `num_micro` microbatches in a lax.scan (one microbatch's activations live at a time).

  Microbatch a holds rows a, a + A, a + 2A, … (A = num_micro), so that each device's rows split
  evenly; each row's latent key depends only on its index, so the result equals one pass over
  the whole batch (up to float summation order)."""
  mask_BT = token_mask(batch)
  num_tokens = jnp.maximum(jnp.sum(mask_BT), 1.0)
  b = mask_BT.shape[0]
  full = {**batch, "keys": row_keys(key, jnp.arange(b)), "mask": mask_BT}
  grad_fn = jax.grad(lambda p, mb: loss_fn(p, {k: v for k, v in mb.items()
                                               if k not in ("keys", "mask")},
                                           mb["keys"], model, mb["mask"], num_tokens, ctl),
                     has_aux=True)
  if num_micro == 1:
    grads, metrics = grad_fn(params, full)
    return _cast_floats(grads, jnp.float32), metrics
  micro = jax.tree_util.tree_map(
      lambda x: jnp.swapaxes(x.reshape(b // num_micro, num_micro, *x.shape[1:]), 0, 1), full)

  def body(carry, mb):
    grads, metrics = grad_fn(params, mb)
    return jax.tree_util.tree_map(jnp.add, carry, (_cast_floats(grads, jnp.float32), metrics)), None

  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32),
                                 jax.eval_shape(grad_fn, params, first))
  (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
  return grads, metrics


def train_step(state, batch, *, model, optimizer, schedule, seed, grad_accum_steps=1,
               control_start=0):
  """One optimizer step. Jit it with `donate_argnums=0`.

  Gradients are float32 (summed over `grad_accum_steps` microbatches); the optimizer runs on
  float32 copies of the parameters and the result is stored in their dtype. A step whose loss
  or gradients are not finite leaves the parameters and optimizer state as they were (and is
  counted in the state); the loop decides whether to go on. With the target-rate KL control
  the controller's state moves after every finite step (from `control_start` on).
  """
  grads, metrics = accumulated_grads(state.params, batch, step_key(seed, state.step), model,
                                     grad_accum_steps, state.latent_ctl)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  keep_if_bad = lambda new, old: jnp.where(finite, new, old)
  params_f32 = _cast_floats(state.params, jnp.float32)
  updates, opt_state = optimizer.update(grads, state.opt_state, params_f32)
  params = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype),
                                  optax.apply_updates(params_f32, updates), state.params)
  first_bad = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                        state.first_nonfinite_step)
  metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(state.step),
             "nonfinite": (~finite).astype(jnp.float32)}
  ctl = state.latent_ctl
  lat = model.cfg.latent
  if lat.enabled and lat.kl_control == "target_rate":
    new_ctl = update_latent_ctl(ctl, metrics["kl"], state.step, lat, control_start)
    ctl = jax.tree_util.tree_map(keep_if_bad, new_ctl, ctl)
    metrics.update(kl_beta=ctl["beta"], kl_ema=ctl["kl_ema"], kl_target=ctl["target"])
  return state.replace(
      step=state.step + 1, params=jax.tree_util.tree_map(keep_if_bad, params, state.params),
      opt_state=jax.tree_util.tree_map(keep_if_bad, opt_state, state.opt_state),
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
      first_nonfinite_step=first_bad, latent_ctl=ctl), metrics


def eval_step(params, batch, key, *, model, bytes_per_token=0.0):
  """Held-out metrics. For the FT, `eval_ce` uses Z uniform (what generation sees; comparable to
  the baseline) and `eval_elbo` is CE with encoder-sampled Z plus the unclipped KL, a bound on
  the NLL. CE with encoder-inferred Z alone sees the targets through the non-causal encoder and
  is deliberately not reported as a metric; `eval_z_use` (uniform-Z CE minus encoder-Z CE) is
  its one diagnostic use, and `eval_z_*` are the diagnostics of `ftjax.zdiag` (KL per bit,
  active bits, I(X; Z) estimates, code usage). For the baseline, eval_elbo = eval_ce (the exact
  NLL)."""
  mask_BT = token_mask(batch)
  mean = lambda x_BT: jnp.sum(x_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)
  if model.cfg.latent.enabled:
    uniform_key, encoder_key = jax.random.split(key)
    ce = mean(_nll(model, params, batch, "uniform", uniform_key)[0])
    nll_BT, aux = _nll(model, params, batch, "encoder", encoder_key)
    out = {"eval_ce": ce, "eval_elbo": mean(nll_BT + aux["kl_BT"]), "eval_kl": mean(aux["kl_BT"])}
    # Diagnostic only (never a model comparison): how much the decoder reads Z, the uniform-Z CE
    # minus the CE with Z sampled from the encoder (which sees the targets). ≈ 0: Z unused.
    out["eval_z_use"] = ce - mean(nll_BT)
    out.update({f"eval_z_{k}": v for k, v in zdiag.diagnostics(
        aux["latent_logits_BTH"], aux["codes_BT"], mask_BT).items()})
  else:
    ce = mean(_nll(model, params, batch, "zero", None)[0])
    out = {"eval_ce": ce, "eval_elbo": ce}
  out["eval_tokens_sum"] = jnp.sum(mask_BT)  # Trainer.evaluate weights the batches by it
  if "target_bytes" in batch:  # exact bits per byte: Trainer.evaluate divides the totals
    scored_BT = batch["segment_ids"] > 0  # the tokens eval_ce averages over
    scored = jnp.sum(scored_BT)
    out.update(eval_nats_sum=out["eval_ce"] * scored, eval_elbo_nats_sum=out["eval_elbo"] * scored,
               eval_bytes_sum=jnp.sum(jnp.where(scored_BT, batch["target_bytes"], 0)))
  elif bytes_per_token:
    out["eval_bpb"] = out["eval_ce"] / (LOG2 * bytes_per_token)
    out["eval_elbo_bpb"] = out["eval_elbo"] / (LOG2 * bytes_per_token)
  return out


def compile_ready_steps(cfg: ConfigDict, mesh: jax.sharding.Mesh) -> tuple:
  """(model, state shardings, jitted init, jitted train step) for `cfg` on `mesh`.

  Nothing is allocated: `jax.eval_shape` gives the shapes, the logical-axis rules the
  shardings. The step donates the state and splits batches over `data` and `fsdp`.
  """
  sharding.check_batch_divisible(cfg, mesh)
  m = cfg.model
  try:
    resolve_attention_impl(m.attention_impl, jnp.dtype(m.dtype), m.head_dim)
  except ValueError as e:
    raise ConfigError("model.attention_impl", str(e)) from None
  device = mesh.devices.flat[0]
  if m.get("matmul_dtype", "default") == "fp8" and not fp8_supported(device):
    raise ConfigError("model.matmul_dtype", f"fp8 needs FP8 matmuls (an NVIDIA GPU of compute "
                      f"capability 8.9 or above: Ada, Hopper, Blackwell); this run's device is "
                      f"{device.platform} ({device.device_kind})")
  model = make_model(cfg.model)
  optimizer = make_optimizer(cfg.train)
  params_sh = sharding.param_shardings(model, mesh, lambda: init_variables(model, cfg.seed))
  abstract_params = jax.eval_shape(lambda: init_params(model, cfg.seed))
  sharding.check_params_divisible(abstract_params, params_sh, mesh)
  sharding.check_replication(abstract_params, params_sh, mesh, cfg.mesh.max_replicated_fraction)
  replicated = NamedSharding(mesh, P())
  state_sh = TrainState(
      step=replicated, params=params_sh,
      opt_state=sharding.opt_state_shardings(optimizer, abstract_params, params_sh, mesh),
      nonfinite_steps=replicated, first_nonfinite_step=replicated,
      latent_ctl=jax.tree_util.tree_map(lambda _: replicated, latent_ctl_init(cfg.model.latent)))
  init = jax.jit(lambda: init_train_state(cfg, model), out_shardings=state_sh)
  step = functools.partial(train_step, model=model, optimizer=optimizer,
                           schedule=lr_schedule(cfg.train), seed=cfg.seed,
                           grad_accum_steps=cfg.train.grad_accum_steps,
                           control_start=cfg.train.warmup_steps)
  step = jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, None), donate_argnums=0)
  return model, state_sh, init, step
