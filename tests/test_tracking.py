"""Trackers (train.trackers: TensorBoard, wandb offline) get metrics.jsonl's rows, the config and
the run name, and a resumed run continues the same wandb run; train.profile_steps writes a JAX
profiler trace of those steps that names the train step, and no trace outlives an error."""

import glob
import gzip
import os
import sys

import jax
import pytest

from ftjax import configs, loop, metrics
from ftjax.trainer import Trainer
from tests.conftest import resolved
from tests.test_late_errors import HOST, _failing


def _cfg(tiny_cfg, **overrides):
  return resolved(tiny_cfg, **{**HOST, **overrides})


def _no_trace_running(tmp_path):
  """jax.profiler refuses a second trace: one can start now only when none is left running."""
  jax.profiler.start_trace(str(tmp_path / "probe"))
  jax.profiler.stop_trace()


@pytest.mark.parametrize("key,value", [("train.profile_steps", "3"),
                                       ("train.profile_steps", "0:2"),
                                       ("train.profile_steps", "5:3"),
                                       ("train.profile_steps", "2:9"),
                                       ("train.trackers", "tb"),
                                       ("train.trackers", "wandb,wandb")])
def test_bad_tracker_and_profile_settings_are_config_errors(tiny_cfg, key, value):
  with pytest.raises(configs.ConfigError, match=key):
    _cfg(tiny_cfg, **{key: value})


def test_profile_steps_write_a_trace_of_the_train_step(tiny_cfg, tmp_path):
  lines = []
  loop.train_and_evaluate(_cfg(tiny_cfg, **{"train.profile_steps": "2:3"}), str(tmp_path),
                          log=lines.append)
  profile = tmp_path / "profile"
  assert f"profile of steps 2-3 in {profile} (TensorBoard's profile plugin" in "\n".join(lines)
  assert glob.glob(str(profile / "plugins/profile/*/*.xplane.pb"))
  traces = glob.glob(str(profile / "plugins/profile/*/*.trace.json.gz"))
  assert traces and b"jit_train_step" in gzip.open(traces[0]).read()
  _no_trace_running(tmp_path)


def test_an_error_inside_the_profiled_steps_stops_the_trace(tiny_cfg, tmp_path):
  cfg = _cfg(tiny_cfg, **{"train.profile_steps": "2:6"})
  trainer = Trainer.create(cfg, run_dir=str(tmp_path))
  _failing(trainer, "train_step", RuntimeError("the step broke"), calls=4)
  lines = []
  with pytest.raises(RuntimeError, match="the step broke"):
    loop.train_and_evaluate(cfg, str(tmp_path), log=lines.append, trainer=trainer)
  assert "profile of steps 2-3 in" in "\n".join(lines)
  assert glob.glob(str(tmp_path / "profile/plugins/profile/*/*.xplane.pb"))
  _no_trace_running(tmp_path)


def test_no_tracker_writes_only_metrics_jsonl(tiny_cfg, tmp_path):
  loop.train_and_evaluate(_cfg(tiny_cfg, **{"train.trackers": ""}), str(tmp_path),
                          log=lambda *_: None, stop_at=2)
  assert {r["step"] for r in metrics.read_rows(str(tmp_path))} == {1, 2}
  assert not (tmp_path / "tb").exists()


def test_wandb_named_but_not_importable_fails_before_compiling(tiny_cfg, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  cfg = _cfg(tiny_cfg, **{"train.trackers": "tensorboard,wandb"})
  trainer = Trainer.create(cfg)

  def compiled(*_):
    raise AssertionError("compiled before the start-up checks")
  trainer.init_state = trainer.train_step = compiled
  with pytest.raises(configs.ConfigError, match=r"^config error: train.trackers: wandb is named but cannot be "
                                                r"imported .*pip install wandb=="):
    loop.train_and_evaluate(cfg, str(tmp_path), trainer=trainer)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
  """wandb, offline (no network), its settings and cache in tmp_path; records what is logged."""
  wandb = pytest.importorskip("wandb")
  for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                      "WANDB_CONFIG_DIR": tmp_path / "wandb_config",
                      "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                      "WANDB_DATA_DIR": tmp_path / "wandb_data"}.items():
    monkeypatch.setenv(name, str(value))
  record = {"inits": [], "rows": []}
  init = wandb.init

  def recording_init(**kwargs):
    run = init(**kwargs)
    record["inits"].append(kwargs)
    log = run.log
    run.log = lambda data, **kw: (record["rows"].append(dict(data)), log(data, **kw))[1]
    return run
  monkeypatch.setattr(wandb, "init", recording_init)
  return record


def test_wandb_gets_the_rows_config_and_name_and_a_resumed_run_continues_it(
    tiny_cfg, tmp_path, wandb_offline):
  run_dir = tmp_path / "my_run"
  cfg = _cfg(tiny_cfg, **{"train.trackers": "tensorboard,wandb"})
  loop.train_and_evaluate(cfg, str(run_dir), log=lambda *_: None, stop_at=4)
  run_id = (run_dir / "wandb_id.txt").read_text().strip()
  loop.train_and_evaluate(cfg, str(run_dir), log=lambda *_: None)
  assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
  assert [(k["id"], k["name"], k["resume"]) for k in wandb_offline["inits"]] == \
      [(run_id, "my_run", "allow")] * 2
  assert wandb_offline["rows"] == metrics.read_rows(str(run_dir))  # steps 1-4, then 5-8, and their evals
  files = sorted(glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb")))
  assert len(files) == 2  # one per start, under the same id (`wandb sync` joins them)
  recorded = open(files[-1], "rb").read()
  assert b"num_bits" in recorded and b"eval_ce" in recorded and b"my_run" in recorded
  assert os.listdir(run_dir / "tb")


def test_a_wandb_failure_is_one_warning_and_the_run_goes_on(tiny_cfg, tmp_path, wandb_offline,
                                                            monkeypatch):
  import wandb
  init = wandb.init

  def unreachable(*_, **__):
    raise ConnectionError("wandb is unreachable")

  def failing_later(**kwargs):
    run = init(**kwargs)
    run.log = unreachable
    return run
  monkeypatch.setattr(wandb, "init", failing_later)
  lines = []
  loop.train_and_evaluate(_cfg(tiny_cfg, **{"train.trackers": "wandb"}), str(tmp_path),
                          log=lines.append)
  warnings = [line for line in lines if "wandb" in line and line.startswith("warning:")]
  assert warnings == ["warning: wandb failed at step 1 (ConnectionError: wandb is unreachable); "
                      "the run goes on without it (metrics.jsonl holds every row)"]
  assert metrics.read_rows(str(tmp_path))[-1]["step"] == 8


def test_wandb_that_does_not_start_is_one_warning(tiny_cfg, tmp_path, wandb_offline,
                                                  monkeypatch):
  import wandb

  def refused(**_):
    raise wandb.errors.UsageError("api_key not configured (no-tty)")
  monkeypatch.setattr(wandb, "init", refused)
  lines = []
  loop.train_and_evaluate(_cfg(tiny_cfg, **{"train.trackers": "wandb"}), str(tmp_path),
                          log=lines.append, stop_at=2)
  assert "warning: wandb did not start at step 0 (UsageError: api_key not configured (no-tty))" \
      in "\n".join(lines)
  assert {r["step"] for r in metrics.read_rows(str(tmp_path))} == {1, 2}
