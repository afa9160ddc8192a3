"""Train state, jitted train and eval steps, and the training loop, as plain functions.

Randomness: the key of step s is fold_in(key(seed), s), split into the latent's key and
nothing else, so Z differs per step, runs are reproducible, and a resumed run draws the same Z.
"""

import dataclasses
import functools
import math
import os
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ftjax import data as data_lib
from ftjax import distributed, losses, metrics as metrics_lib, sampling, sharding
from ftjax.model import Transformer, make_model

LOG2 = math.log(2)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_steps: jax.Array  # steps whose loss or gradients were not finite (update skipped)
  first_nonfinite_step: jax.Array  # the first of them, -1 if none


class NonFiniteError(RuntimeError):
  """Raised by the loop with train.on_nonfinite="stop"; the message names the step."""


def lr_schedule(t):
  """Linear warm-up to `t.lr`, then cosine decay to `t.lr * t.lr_final_fraction`."""
  return optax.warmup_cosine_decay_schedule(
      0.0, t.lr, max(t.warmup_steps, 1), max(t.steps, t.warmup_steps + 1),
      end_value=t.lr * t.lr_final_fraction)


def _decay_mask(params):
  """Weight decay on matmul kernels and the embedding; not on norms, ζ or the post-sampler
  (whose rows only move when their code is sampled)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key in ("kernel", "embed"), params)


def make_optimizer(t):
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  chain.append(optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                           mask=_decay_mask))
  return optax.chain(*chain)


def step_key(seed, step):
  return jax.random.fold_in(jax.random.key(seed), step)


def init_variables(model, seed):
  """Variables with their logical-axis metadata (nn.Partitioned boxes)."""
  tokens = jnp.zeros((1, model.cfg.seq_len), jnp.int32)
  return model.init(jax.random.key(seed), tokens, z_mode="encoder", latent_key=jax.random.key(0))


def init_params(model, seed):
  """Parameters for `model`, unboxed from their logical-axis metadata."""
  return nn.meta.unbox(init_variables(model, seed)["params"])


def init_train_state(cfg, model):
  params = init_params(model, cfg.seed)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=make_optimizer(cfg.train).init(params),
                    nonfinite_steps=jnp.zeros((), jnp.int32),
                    first_nonfinite_step=jnp.full((), -1, jnp.int32))


def _nll(model, params, batch, z_mode, key):
  """Per-token NLL (B, T) and the model's aux for one z_mode."""
  m = model.cfg
  x_BTD, aux = model.apply({"params": params}, batch["inputs"], z_mode=z_mode, latent_key=key,
                           return_hidden=True)
  nll_BT = losses.cross_entropy(x_BTD, params["unembed"]["kernel"], batch["targets"],
                                chunk_tokens=m.ce_chunk_tokens, dtype=jnp.dtype(m.dtype))
  return nll_BT, aux


def loss_fn(params, batch, key, model):
  """CE + (1/T) Σ_t max(0, KL_t − κ); returns (loss, metrics)."""
  lat = model.cfg.latent
  nll_BT, aux = _nll(model, params, batch, "encoder", key)
  ce = jnp.mean(nll_BT)
  if not lat.enabled:
    return ce, {"loss": ce, "ce": ce}
  kl_BT = aux["kl_BT"]
  kl_clipped = losses.free_bits_kl(kl_BT, lat.kappa)
  loss = ce + kl_clipped
  return loss, {"loss": loss, "ce": ce, "kl": jnp.mean(kl_BT), "kl_clipped": kl_clipped,
                "kl_frac_above_kappa": jnp.mean((kl_BT > lat.kappa).astype(jnp.float32))}


def train_step(state, batch, *, model, optimizer, schedule, seed):
  """One optimizer step. Jit it with `donate_argnums=0`.

  A step whose loss or gradients are not finite leaves the parameters and optimizer state as
  they were (and is counted in the state); the loop decides whether to go on.
  """
  grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch,
                                                    step_key(seed, state.step), model)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep_if_bad = lambda new, old: jnp.where(finite, new, old)
  first_bad = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                        state.first_nonfinite_step)
  metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(state.step),
             "nonfinite": (~finite).astype(jnp.float32)}
  return state.replace(
      step=state.step + 1, params=jax.tree_util.tree_map(keep_if_bad, params, state.params),
      opt_state=jax.tree_util.tree_map(keep_if_bad, opt_state, state.opt_state),
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
      first_nonfinite_step=first_bad), metrics


def eval_step(params, batch, key, *, model, bytes_per_token=0.0):
  """Held-out metrics. For the FT, `eval_ce` uses Z uniform (what generation sees; comparable to
  the baseline) and `eval_elbo` is CE with encoder-sampled Z plus the unclipped KL, a bound on
  the NLL. CE with encoder-inferred Z alone sees the targets through the non-causal encoder and
  is deliberately not reported. For the baseline, eval_elbo = eval_ce (the exact NLL)."""
  if model.cfg.latent.enabled:
    uniform_key, encoder_key = jax.random.split(key)
    ce = jnp.mean(_nll(model, params, batch, "uniform", uniform_key)[0])
    nll_BT, aux = _nll(model, params, batch, "encoder", encoder_key)
    out = {"eval_ce": ce, "eval_elbo": jnp.mean(nll_BT + aux["kl_BT"]),
           "eval_kl": jnp.mean(aux["kl_BT"])}
  else:
    ce = jnp.mean(_nll(model, params, batch, "zero", None)[0])
    out = {"eval_ce": ce, "eval_elbo": ce}
  if bytes_per_token:
    out["eval_bpb"] = out["eval_ce"] / (LOG2 * bytes_per_token)
    out["eval_elbo_bpb"] = out["eval_elbo"] / (LOG2 * bytes_per_token)
  return out


def compile_ready_steps(cfg, mesh):
  """(model, state shardings, jitted init, jitted train step) for `cfg` on `mesh`.

  Nothing is allocated: `jax.eval_shape` gives the shapes, the logical-axis rules the
  shardings. The step donates the state and splits batches over `data` and `fsdp`.
  """
  sharding.check_divisible(cfg, tuple(mesh.shape.values()))
  model = make_model(cfg.model)
  optimizer = make_optimizer(cfg.train)
  params_sh = sharding.param_shardings(model, mesh, lambda: init_variables(model, cfg.seed))
  abstract_params = jax.eval_shape(lambda: init_params(model, cfg.seed))
  sharding.check_replication(abstract_params, params_sh, mesh, cfg.mesh.max_replicated_fraction)
  replicated = NamedSharding(mesh, P())
  state_sh = TrainState(
      step=replicated, params=params_sh,
      opt_state=sharding.opt_state_shardings(optimizer, abstract_params, params_sh, mesh),
      nonfinite_steps=replicated, first_nonfinite_step=replicated)
  init = jax.jit(lambda: init_train_state(cfg, model), out_shardings=state_sh)
  step = functools.partial(train_step, model=model, optimizer=optimizer,
                           schedule=lr_schedule(cfg.train), seed=cfg.seed)
  step = jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, None), donate_argnums=0)
  return model, state_sh, init, step


@dataclasses.dataclass
class Trainer:
  """Everything a training loop needs, built once from a resolved config and a mesh.

  The train state lives sharded by `ftjax.sharding.LOGICAL_RULES`; batches are split over the
  `data` and `fsdp` axes. Call the steps through `init_state`, `train_step`, `eval_step` (they
  enter the mesh and the logical-axis rules).
  """
  cfg: Any
  model: Transformer
  source: data_lib.Source
  mesh: jax.sharding.Mesh
  state_sharding: Any
  _init: Any
  _train_step: Any
  _eval_step: Any

  @classmethod
  def create(cls, cfg, devices=None, run_dir=None):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    model, state_sh, init, step = compile_ready_steps(cfg, mesh)
    source = data_lib.make_source(cfg, run_dir)
    evaluate = functools.partial(eval_step, model=model, bytes_per_token=source.bytes_per_token)
    evaluate = jax.jit(evaluate, in_shardings=(state_sh.params, sharding.batch_sharding(mesh), None))
    return cls(cfg, model, source, mesh, state_sh, init, step, evaluate)

  def _in_mesh(self, fn, *args):
    with sharding.in_mesh(self.mesh):
      return fn(*args)

  def init_state(self):
    return self._in_mesh(self._init)

  def abstract_state(self):
    """Shapes, dtypes and shardings of the train state, nothing allocated."""
    return self._in_mesh(jax.eval_shape, self._init)

  def train_step(self, state, batch):
    return self._in_mesh(self._train_step, state, batch)

  def eval_step(self, params, batch, key):
    return self._in_mesh(self._eval_step, params, batch, key)

  def stream(self, split="train"):
    """This process's stream of `split` batches, from its start (see ftjax.data)."""
    size = self.cfg.train.batch_size
    rows = distributed.process_rows(sharding.batch_sharding(self.mesh),
                                    (size, self.cfg.model.seq_len))
    return self.source.stream(split, size, rows, jax.process_index(), jax.process_count())

  def to_global(self, local_batch):
    """A global batch from this process's rows."""
    return distributed.global_batch(local_batch, sharding.batch_sharding(self.mesh),
                                    self.cfg.train.batch_size)

  def batch(self, step, split="train"):
    """Global batch number `step` of `split`, read from a fresh stream (tests, benchmarks)."""
    stream = self.stream(split)
    for _ in range(step):
      next(stream)
    return self.to_global(next(stream))

  def evaluate(self, params, split="validation", num_batches=None, key=None):
    """Mean of the eval metrics over the first `num_batches` (default `train.eval_batches`)
    batches of `split`, with fixed keys."""
    key = jax.random.key(self.cfg.seed + 1) if key is None else key
    stream = self.stream(split)
    rows = [self.eval_step(params, self.to_global(next(stream)), jax.random.fold_in(key, i))
            for i in range(num_batches or self.cfg.train.eval_batches)]
    rows = distributed.fetch(rows)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def format_progress(step, total, m, tokens_per_step):
  """One readable line: step, loss, ce, kl in bits, tokens/s, MFU, ETA."""
  parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"ce {m['ce']:.4f}"]
  if "kl" in m:
    parts.append(f"kl {m['kl'] / LOG2:.3f} bits")
  if "tokens_per_sec" in m:
    eta_s = int((total - step) * tokens_per_step / max(m["tokens_per_sec"], 1e-9))
    parts += [f"{m['tokens_per_sec']:,.0f} tok/s", f"MFU {100 * m['mfu']:.1f}%",
              f"ETA {eta_s // 60}m{eta_s % 60:02d}s"]
  return " | ".join(parts)


def _describe(cfg, trainer, state):
  """Start-up lines: parameters, latent, mesh and how much of the parameters is replicated."""
  lat = cfg.model.latent
  latent = (f"latent on (H={lat.num_bits}, kappa={lat.kappa:.4f} nats)" if lat.enabled else
            "latent off (baseline)")
  lines = [f"model: {metrics_lib.count_params(state.params):,} parameters; {latent}"]
  if trainer.mesh.devices.size > 1:
    replicated = sharding.replicated_fraction(state.params, trainer.state_sharding.params)
    lines.append(f"mesh {dict(trainer.mesh.shape)}: {100 * replicated:.1f}% of the parameter "
                 "bytes replicated on every device")
  return lines


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop polls: it saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _agreed(*flags_):
  """Host-side decisions all processes take together (any process asking is enough)."""
  flags_ = np.array(flags_, bool)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    flags_ = np.asarray(multihost_utils.process_allgather(flags_)).any(axis=0)
  return [bool(f) for f in flags_]


def _check_nonfinite(state, cfg, manager, log):
  """Reports skipped non-finite steps; raises NonFiniteError under on_nonfinite="stop"."""
  count, first = (int(x) for x in distributed.fetch(
      (state.nonfinite_steps, state.first_nonfinite_step)))
  if not count:
    return 0
  if cfg.train.on_nonfinite == "stop":
    steps = manager.all_steps()
    raise NonFiniteError(
        f"non-finite loss or gradients at step {first}; stopped (train.on_nonfinite=stop). "
        + (f"The newest checkpoint, step {steps[-1]}, is from before it." if steps else
           "No checkpoint was written."))
  return count


def train_and_evaluate(cfg, workdir, log=print, stop_at=None):
  """Trains a resolved config in `workdir`; resumes from its newest readable checkpoint.
  Returns the final TrainState.

  Checkpoints: every `checkpoint.every_steps` steps and `checkpoint.every_seconds` seconds
  (async), at the end, and on SIGTERM/SIGINT (then the function returns early). `stop_at` ends
  the run at that step with a checkpoint, as a preemption would; the schedule stays that of
  `train.steps`.
  """
  from ftjax import checkpoint as ckpt_lib  # orbax is heavy to import; only the loop needs it

  if jax.process_index() != 0:  # one process logs and writes files; all of them compute
    log = lambda *_: None
  else:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
  trainer = Trainer.create(cfg, run_dir=workdir)
  if jax.process_index() == 0 and trainer.source.tokenizer is not None:
    from ftjax.data import tokenizers
    tokenizers.save_with_run(trainer.source.tokenizer, workdir)
  t, c = cfg.train, cfg.checkpoint
  manager = ckpt_lib.Manager(os.path.join(workdir, "checkpoints"), cfg, log=log)
  stream = trainer.stream("train")
  state, data_state = manager.restore_or(trainer.init_state, trainer.abstract_state())
  if data_state is not None:
    stream.set_state(data_state)
  start = int(state.step)
  if start:
    log(f"resumed from step {start}")
  for line in _describe(cfg, trainer, state):
    log(line)
  peak = t.peak_flops or metrics_lib.measure_matmul_peak(jnp.dtype(cfg.model.dtype))
  flops_per_token = metrics_lib.flops_per_token(cfg.model)
  tokens_per_step = t.batch_size * cfg.model.seq_len
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  reported_nonfinite = 0

  pending = None  # (step, device metrics) fetched one step late, so the step never syncs
  clock = None  # (time, step) throughput is measured from
  last_save = time.monotonic()

  def flush(pending, clock):
    """Fetches and logs a step's metrics; throughput is measured since `clock`."""
    step, device_metrics = pending
    row = distributed.fetch(device_metrics)
    now = time.perf_counter()
    if step > clock[1]:
      rate = (step - clock[1]) * tokens_per_step / max(now - clock[0], 1e-9)
      row.update(tokens_per_sec=rate, mfu=rate * flops_per_token / peak)
    writer.write(step, row)
    log(format_progress(step, t.steps, row, tokens_per_step))
    return (now, step)

  end = t.steps if stop_at is None else min(stop_at, t.steps)
  with _Preemption() as preemption:
    try:
      for step in range(start, end):
        state, device_metrics = trainer.train_step(state, trainer.to_global(next(stream)))
        done = step + 1
        if pending is not None:
          clock, pending = flush(pending, clock), None
        if clock is None:  # after compilation, evaluation or a save: sync once, restart the clock
          jax.block_until_ready(state)
          clock = (time.perf_counter(), done)
        is_log = done % t.log_every == 0 or done == end
        if is_log:
          pending = (done, device_metrics)
        is_eval = done % t.eval_every == 0 or done == end
        is_save = bool(c.every_steps) and done % c.every_steps == 0
        preempted = due = False
        if jax.process_count() == 1 or is_log:  # multi-process: agree at log steps only
          preempted, due = _agreed(preemption.requested,
                                   bool(c.every_seconds) and
                                   time.monotonic() - last_save >= c.every_seconds)
        if (is_eval or is_save or due or preempted) and pending is not None:
          clock, pending = flush(pending, clock), None
        if is_log or is_eval or is_save or due or preempted:
          count = _check_nonfinite(state, cfg, manager, log)
          if count > reported_nonfinite:
            log(f"warning: {count} step(s) with non-finite loss or gradients skipped so far "
                f"(the first at step {int(state.first_nonfinite_step)})")
            reported_nonfinite = count
        if is_eval:
          ev = trainer.evaluate(state.params)
          writer.write(done, ev)
          log(f"eval step {done} | " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
          clock = None
        if is_save or due or preempted:
          manager.save(done, state, stream.get_state())
          last_save, clock = time.monotonic(), None
        if preempted:
          manager.wait()
          log(f"stopped by a signal at step {done}: checkpoint saved; run the same command "
              "to resume")
          writer.close()
          return state
      if pending is not None:
        flush(pending, clock)
      _check_nonfinite(state, cfg, manager, log)
      manager.save(int(state.step), state, stream.get_state())
    finally:
      manager.close()
      stream.close()
  if t.num_samples and jax.process_count() > 1:
    log("samples are printed by single-process runs only")
  elif t.num_samples:
    text = show_samples(trainer, state.params, t.num_samples, log)
    writer.write_text(int(state.step), "samples", text)
  writer.close()
  return state


def sample_texts(trainer, params, num_samples, key, temperature=1.0):
  """`num_samples` sequences from the source's prompts to the training length, Z uniform per
  token (KV-cache decoding), decoded to text."""
  cfg = trainer.cfg
  prompts_BP = jnp.asarray(trainer.source.prompts(num_samples))
  out = sampling.generate(make_model(cfg.model, decode=True), params, prompts_BP,
                          jnp.zeros((num_samples,), jnp.int32), key,
                          max_new_tokens=cfg.model.seq_len + 1 - prompts_BP.shape[1],
                          temperature=temperature)
  return [trainer.source.decode(row) for row in np.asarray(out["tokens"])]


def show_samples(trainer, params, num_samples, log=print, temperature=1.0):
  """Logs samples (Z uniform per token); for the synthetic task also the share well-formed."""
  from ftjax.data import synthetic
  cfg = trainer.cfg
  texts = sample_texts(trainer, params, num_samples, jax.random.key(cfg.seed + 2), temperature)
  log(f"samples (Z uniform per token, temperature {temperature}):")
  for s in texts:
    log("  " + s.replace("\n", "\\n"))
  if trainer.source.name == "synthetic":
    log(f"well-formed: {sum(synthetic.well_formed(texts, cfg.data.block_len))}/{len(texts)}")
  return "\n".join(texts)
