"""The run directory: its layout, every file in it besides the orbax arrays, and restoring a run
for inference.

    RUN/config.json            the resolved config as a record (rewritten at each start; restores
                               read the config saved with the checkpoint instead)
    RUN/config.py              imported runs: the config to continue training with
    RUN/metrics.jsonl          metrics (ftjax.metrics), also sent to the trackers (ftjax.trackers):
    RUN/tb/                    TensorBoard events
    RUN/wandb/, wandb_id.txt   wandb's files and the id a resumed run continues
    RUN/profile/               JAX profiler traces (train.profile_steps)
    RUN/checkpoints/           orbax steps, data-stream states, checksums (ftjax.checkpoint)
    RUN/tokenizer.model | tokenizer.json   the data tokenizer's copy (ftjax.data.tokenizers)
    RUN/hf_config.json, hf_tokenizer/      an imported Hugging Face checkpoint's config and
                               tokenizer files (ftjax.hf)
    RUN/run_checksums.json     SHA-256 of the files above that sampling, evaluation and export
                               read (written last by process 0; checked before they are used)

`load_for_inference` gives the config, model, parameters and text codec of a run without a data
source, an optimizer or a Trainer. Storage layer: it imports neither `ftjax.trainer` nor
`ftjax.loop` nor the data pipeline.
"""

import dataclasses
import json
import os
from typing import Any, Optional

import jax

from ftjax import checkpoint as ckpt_lib, integrity, sharding, storage
from ftjax.data import run_text  # the text codec only: no data pipeline is built
from ftjax.errors import CheckpointError
from ftjax.metrics import write_error
from ftjax.model import make_model
from ftjax.train import init_params, init_variables  # the model's initialiser; no optimizer

CONFIG_FILE = "config.json"
CONFIG_PY = "config.py"
CHECKPOINTS_DIR = "checkpoints"
RUN_CHECKSUMS = "run_checksums.json"
HF_CONFIG_FILE = "hf_config.json"  # the imported config.json, for export
HF_TOKENIZER_DIR = "hf_tokenizer"  # the imported checkpoint's tokenizer files
TB_DIR = "tb"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "wandb_id.txt"
PROFILE_DIR = "profile"
TOKENIZER_FILES = {"sentencepiece": "tokenizer.model", "hf": "tokenizer.json"}  # the data's


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS_DIR)


def write_config(workdir: str, cfg: Any) -> None:
  """Writes RUN/config.json (the resolved config), first removing RUN/run_checksums.json, so a run
  killed before the checksums are rewritten has none rather than stale ones. WriteError."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    storage.makedirs(workdir)
    if storage.exists(os.path.join(workdir, RUN_CHECKSUMS)):
      storage.remove(os.path.join(workdir, RUN_CHECKSUMS))
    storage.write_bytes(path, cfg.to_json_best_effort(indent=2, sort_keys=True).encode())
  except OSError as e:
    raise write_error(path, e) from None


def run_files(workdir: str) -> list[str]:
  """The files of a run directory that sampling, evaluation or export read besides its
  checkpoints: its config record, an imported checkpoint's config and its tokenizer files."""
  names = [CONFIG_FILE, HF_CONFIG_FILE, *TOKENIZER_FILES.values()]
  tokenizer_dir = os.path.join(workdir, HF_TOKENIZER_DIR)
  if storage.isdir(tokenizer_dir):
    names += [os.path.join(HF_TOKENIZER_DIR, n) for n in storage.listdir(tokenizer_dir)]
  return sorted(n for n in names if storage.isfile(os.path.join(workdir, n)))


def write_run_checksums(workdir: str) -> None:
  """Writes `workdir/run_checksums.json`: the SHA-256 of each of the run's files (`run_files`)
  (process 0, after it wrote them)."""
  integrity.write_checked(os.path.join(workdir, RUN_CHECKSUMS),
                          {rel: integrity.file_sha256(os.path.join(workdir, rel))
                           for rel in run_files(workdir)}, sync=True)


def verify_run_files(workdir: str, skip: tuple[str, ...] = ()) -> None:
  """Checks a run's files against `run_checksums.json` (a run without it, saved by an older
  ftjax, is not checked); raises a one-line CheckpointError naming the first damaged or missing
  file. `skip`: files the caller is about to rewrite."""
  path = os.path.join(workdir, RUN_CHECKSUMS)
  if not storage.exists(path):
    return
  try:
    files = integrity.read_checked(path)
  except integrity.Unreadable as e:
    raise CheckpointError(f"{path} is damaged ({e}): the run's tokenizer and config files "
                          "cannot be checked") from None
  for rel, digest in sorted(files.items()):
    if rel in skip:
      continue
    full = os.path.join(workdir, rel)
    if not storage.isfile(full):
      raise CheckpointError(f"{full} is missing (listed in {RUN_CHECKSUMS})")
    if integrity.file_sha256(full) != digest:
      raise CheckpointError(f"{full} is damaged: its SHA-256 differs from {RUN_CHECKSUMS}'s "
                            "(restore the file from a copy of the run)")


def newest_note(workdir: str) -> str:
  """A sentence naming the newest complete checkpoint of a run directory."""
  steps = ckpt_lib.committed_steps(checkpoints_dir(workdir))
  return (f"The newest complete checkpoint is step {steps[-1]}." if steps else
          "No checkpoint has been completed yet.")


def is_finished(workdir: str) -> bool:
  """Whether the run's checkpoints hold the last step of the config it last started with."""
  try:
    steps = json.loads(storage.read_bytes(os.path.join(workdir, CONFIG_FILE)))["train"]["steps"]
  except (OSError, json.JSONDecodeError, KeyError):
    return False
  return steps in ckpt_lib.committed_steps(checkpoints_dir(workdir))


def _require_run(workdir: str) -> str:
  """The run's checkpoint directory; CheckpointError when `workdir` is not a run with one."""
  ckpt_lib.require_storage(workdir)
  directory = checkpoints_dir(workdir)
  if not storage.isdir(directory):
    if not storage.exists(os.path.join(workdir, CONFIG_FILE)):
      raise CheckpointError(f"{os.path.join(workdir, CONFIG_FILE)} not found: is {workdir} a "
                            "run directory?")
    raise CheckpointError(f"no checkpoint in {storage.absolute(directory)}")
  return directory


def open_checkpoints(workdir: str, verify: bool = True) -> ckpt_lib.Manager:
  """The run's checkpoints, opened read-only once its own files are verified (`verify`; the
  manager then verifies the steps it reads, each once). CheckpointError for a missing run."""
  directory = _require_run(workdir)
  if verify:
    verify_run_files(workdir)
  manager = ckpt_lib.Manager(directory, read_only=True)
  manager.verify = verify
  return manager


def saved_config(manager: ckpt_lib.Manager, workdir: str, step: Optional[int] = None,
                 mesh: Optional[dict] = None) -> tuple[Any, int]:
  """(config, step): the resolved config saved with `step` (None: the newest), checked by the
  step's checksums, its mesh replaced by `mesh` ({'data', 'fsdp', 'tensor'}: sizes, 1 for an
  axis not named; default one device)."""
  steps = manager.saved_steps(step)
  chosen = steps[-1] if step is None else step
  try:
    cfg = manager.saved_config(chosen).copy_and_resolve_references()
  except CheckpointError as e:
    raise older_steps_note(e, workdir, chosen) from None
  cfg.unlock()
  cfg.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **(mesh or {})})
  cfg.lock()
  return cfg, chosen


def older_steps_note(error: CheckpointError, workdir: str, step: int) -> CheckpointError:
  """`error` with the run's older steps named, when it says a step is damaged."""
  older = [s for s in ckpt_lib.committed_steps(checkpoints_dir(workdir)) if s < step]
  if older and "damaged" in str(error):
    return CheckpointError(f"{error}; older steps: {older} (choose one with --step)")
  return error


@dataclasses.dataclass
class Inference:
  """A run restored for sampling, scoring or export: no data source, no optimizer."""
  cfg: Any
  step: int
  mesh: jax.sharding.Mesh
  model: Any
  params: Any
  text: Any  # ftjax.data.Text: encode / decode with the run's own tokenizer


def load_for_inference(workdir: str, step: Optional[int] = None, mesh: Optional[dict] = None,
                       verify: bool = True) -> Inference:
  """The run in `workdir` at `step` (None: the newest), its parameters restored (sharded by the
  logical-axis rules onto `mesh`'s devices; default one device) from the checkpoint alone: the
  optimizer state is not read, the training data is not opened. CheckpointError for a missing
  or damaged run."""
  manager = open_checkpoints(workdir, verify)
  try:
    cfg, chosen = saved_config(manager, workdir, step, mesh)
    device_mesh = sharding.make_mesh(cfg.mesh)
    model = make_model(cfg.model)
    abstract = _abstract_params(model, cfg.seed, device_mesh)
    try:
      params = manager.restore_params(chosen, abstract)
    except CheckpointError as e:
      raise older_steps_note(e, workdir, chosen) from None
  finally:
    manager.close()
  return Inference(cfg, chosen, device_mesh, model, params, run_text(cfg, workdir))


def _abstract_params(model: Any, seed: int, mesh: jax.sharding.Mesh) -> Any:
  """Shapes, dtypes and shardings (logical-axis rules on `mesh`) of `model`'s parameters."""
  shardings = sharding.param_shardings(model, mesh, lambda: init_variables(model, seed))
  shapes = jax.eval_shape(lambda: init_params(model, seed))
  sharding.check_params_divisible(shapes, shardings, mesh)
  return jax.tree_util.tree_map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, shardings)
