"""The run directory layer (ftjax.run): inference restores without data or optimizer, the
module graph has no cycle, and the storage layer does not import the training bundle."""

import ast
import pathlib
import shutil

import jax
import numpy as np
import pytest

from ftjax import checkpoint, data, loop, run
from ftjax.data import prepared
from ftjax.trainer import Trainer, load_run
from tests.conftest import REPO, resolved

STORAGE = ("ftjax.errors", "ftjax.integrity", "ftjax.checkpoint", "ftjax.run")
TRAINING_BUNDLE = ("ftjax.trainer", "ftjax.loop")  # the Trainer (data source + compiled steps)


def _module_imports():
  """{module: the ftjax modules it imports anywhere in its file}, a submodule import counting
  for its packages too (importing it runs their __init__)."""
  files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
           for p in pathlib.Path(REPO, "ftjax").rglob("*.py")}
  graph = {}
  for name, path in files.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                   for a in node.names]
      else:
        continue
      for target in targets:
        while target.count("."):
          if target in files and target != name and not name.startswith(target + "."):
            found.add(target)
          target = target.rpartition(".")[0]
    graph[name] = found
  return graph


def test_no_import_cycle_and_no_training_bundle_in_the_storage_layer():
  graph = _module_imports()
  state = {}

  def visit(module, path):
    state[module] = "open"
    for target in sorted(graph[module]):
      assert state.get(target) != "open", "import cycle: " + " -> ".join(path + [target])
      if target not in state:
        visit(target, path + [target])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  for module in STORAGE:
    reached, todo = set(), [module]
    while todo:
      for target in graph[todo.pop()] - reached:
        reached.add(target)
        todo.append(target)
    assert not reached & set(TRAINING_BUNDLE), f"{module} imports {reached & set(TRAINING_BUNDLE)}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  from experiments import tiny
  from ftjax.configs import resolve
  workdir = tmp_path_factory.mktemp("run")
  cfg = resolved(resolve(tiny.get_config()), **{"train.steps": 4, "train.num_samples": 0,
                                                "train.peak_flops": 1.0})
  loop.train_and_evaluate(cfg, str(workdir), log=lambda *_: None)
  return workdir


def test_inference_restores_the_parameters_without_data_optimizer_or_trainer(trained,
                                                                             monkeypatch):
  _, state = load_run(str(trained))
  want = jax.tree_util.tree_leaves(jax.device_get(state.params))

  def refused(*_, **__):
    raise AssertionError("inference built a Trainer or a data source")
  monkeypatch.setattr(Trainer, "create", refused)
  monkeypatch.setattr(data, "make_source", refused)
  restored = run.load_for_inference(str(trained))
  assert restored.step == 4 and restored.mesh.devices.size == 1
  got = jax.tree_util.tree_leaves(jax.device_get(restored.params))
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  assert restored.text.decode(restored.text.encode("A>", True)) == "A>"
  sharded = run.load_for_inference(str(trained), mesh={"fsdp": 4, "tensor": 2})
  assert sharded.mesh.devices.size == 8
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(sharded.params)), want):
    np.testing.assert_array_equal(a, b)


def test_inference_refuses_a_damaged_step_and_names_the_older_ones(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint for step 3"):
    run.load_for_inference(str(workdir), step=3)
  for path in (workdir / "checkpoints" / "4" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 64:
      path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
      break
  with pytest.raises(checkpoint.CheckpointError, match="step 4 .* is damaged"):
    run.load_for_inference(str(workdir))


def test_a_run_whose_training_data_is_gone_still_restores_for_inference(tiny_cfg, tmp_path):
  (tmp_path / "corpus.txt").write_text("\n".join(f"line {i} of the corpus" for i in range(300)))
  prepared.prepare(prepared.Settings(inputs=(str(tmp_path / "corpus.txt"),), tokenizer="bytes",
                                     text_unit="line", docs_per_shard=100), str(tmp_path / "data"))
  cfg = resolved(tiny_cfg, **{"data.name": "prepared", "data.path": str(tmp_path / "data"),
                              "data.tokenizer": "auto", "model.vocab_size": 320,
                              "train.steps": 2, "train.eval_every": 2, "train.num_samples": 0,
                              "train.peak_flops": 1.0})
  loop.train_and_evaluate(cfg, str(tmp_path / "run"), log=lambda *_: None)
  shutil.rmtree(tmp_path / "data")
  restored = run.load_for_inference(str(tmp_path / "run"))
  assert restored.step == 2
  assert restored.text.decode(restored.text.encode("héllo", True)) == "héllo"


def test_is_finished_reads_the_run_directory(trained, tmp_path):
  assert run.is_finished(str(trained))
  assert not run.is_finished(str(tmp_path))
  shutil.copytree(trained, tmp_path / "run")
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
  assert not run.is_finished(str(tmp_path / "run"))
