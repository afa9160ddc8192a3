"""`Trainer`: a config's model, data source, mesh and compiled steps, built once.

Used by the training loop (`ftjax.loop`), by `load_run` (a run restored with its data, for
evaluation) and by tests and benchmarks that step a model by hand.
"""

import dataclasses
import functools
from typing import Any, Optional

import jax
import numpy as np

from ftjax import data as data_lib
from ftjax import distributed, sharding, train
from ftjax.errors import CheckpointError
from ftjax.model import Transformer

STOP_EVERY = 16  # evaluation batches between two stop checks with several processes
QUEUED = 8  # evaluation batches dispatched ahead of the device

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
    model, state_sh, init, step = train.compile_ready_steps(cfg, mesh)
    source = data_lib.make_source(cfg, run_dir)
    evaluate = functools.partial(train.eval_step, model=model, bytes_per_token=source.bytes_per_token)
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

  def evaluate(self, params, split="validation", num_batches=None, key=None, stop=None):
    """Mean of the eval metrics over the first `num_batches` (default `train.eval_batches`)
    batches of `split`, with fixed keys, each batch weighted by the tokens it scores
    (`eval_tokens`: their total). Bits per byte, where the batches carry `target_bytes`,
    are exact: the nats of all scored tokens over ln 2 × all the bytes their targets decode to.

    `stop()` is asked before every batch with one process, every STOP_EVERY batches with several
    (a collective: it must answer alike everywhere); once it says True the evaluation ends and
    returns None. At most QUEUED batches run ahead of the device, so that ending is quick."""
    key = jax.random.key(self.cfg.seed + 1) if key is None else key
    every = 1 if jax.process_count() == 1 else STOP_EVERY
    stream = self.stream(split)
    rows = []
    try:
      for i in range(num_batches or self.cfg.train.eval_batches):
        if stop is not None and i % every == 0 and stop():
          return None
        rows.append(self.eval_step(params, self.to_global(next(stream)),
                                   jax.random.fold_in(key, i)))
        if len(rows) > QUEUED:
          jax.block_until_ready(rows[-QUEUED - 1])
    finally:
      stream.close()
    rows = distributed.fetch(rows)
    tokens = np.array([float(r["eval_tokens_sum"]) for r in rows])  # scored tokens per batch
    out = {k: float(np.sum(tokens * [float(r[k]) for r in rows]) / max(tokens.sum(), 1.0))
           for k in rows[0] if not k.endswith("_sum")}
    out["eval_tokens"] = int(tokens.sum())
    if "eval_bytes_sum" in rows[0]:
      total_bytes = max(sum(int(r["eval_bytes_sum"]) for r in rows), 1)
      for name, nats in (("eval_bpb", "eval_nats_sum"), ("eval_elbo_bpb", "eval_elbo_nats_sum")):
        out[name] = sum(float(r[nats]) for r in rows) / (train.LOG2 * total_bytes)
    return out


def load_run(workdir: str, step: Optional[int] = None, mesh: Optional[dict] = None,
             verify: bool = True, optimizer: bool = False) -> tuple[Trainer, Any]:
  """(trainer, state) of a run restored onto the devices at hand, from `step` (None: the newest
  readable one), with the run's data source (evaluation; `ftjax.run.load_for_inference` needs
  no data). The config is the one saved with the checkpoint (checked by its checksums), so a
  damaged `config.json` cannot change the model; a damaged step is a CheckpointError.

  The optimizer state (two float32 moments per parameter: 2/3 or more of a checkpoint) is
  left as `ocp.PLACEHOLDER` leaves, not read, unless `optimizer=True`.

  `mesh` ({'data', 'fsdp', 'tensor'}: sizes, 1 for an axis not named; default one device)
  replaces the mesh the run trained on; the checkpoint is resharded onto it.
  """
  from ftjax import checkpoint, run
  manager = run.open_checkpoints(workdir, verify)
  try:
    cfg, chosen = run.saved_config(manager, workdir, step, mesh)
    trainer = Trainer.create(cfg, run_dir=workdir)  # with the run's own tokenizer
    wanted = trainer.abstract_state()
    try:
      state, _ = manager.restore(chosen, wanted if optimizer else
                                 checkpoint.without_optimizer(wanted))
    except CheckpointError as e:
      raise run.older_steps_note(e, workdir, chosen) from None
  finally:
    manager.close()
  return trainer, state
