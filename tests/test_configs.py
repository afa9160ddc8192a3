"""Config schema: experiment files resolve; every bad value exits 2 with one line naming the key."""

import os
import subprocess
import sys

import pytest

from ftjax.configs import _flat_keys, ConfigError, default_config, resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ["tiny", "synthetic", "shakespeare", "ft_1p5b", "ft_8b"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_configs_resolve(name):
  import importlib
  cfg = resolve(importlib.import_module(f"experiments.{name}").get_config())
  assert cfg.model.latent.inject_layer == cfg.model.num_layers // 2
  assert cfg.model.head_dim * cfg.model.num_heads == cfg.model.d_model
  assert resolve(cfg).to_dict() == cfg.to_dict()  # idempotent: saved configs load again


def test_kappa_bits_become_nats():
  cfg = default_config()
  cfg.model.latent.kappa_bits = 0.5
  cfg.model.seq_len = 66
  resolved = resolve(cfg)
  assert abs(resolved.model.latent.kappa - 0.34657359) < 1e-7
  assert resolved.model.latent.kappa_bits is None


def test_odd_depth_needs_an_injection_layer_only_with_the_latent():
  cfg = default_config()
  cfg.model.seq_len = 66
  cfg.model.num_layers = 5  # the baseline with one more layer than a 4-block FT
  cfg.model.latent.kappa_bits = 0.5
  cfg.model.latent.enabled = False
  assert resolve(cfg).model.num_layers == 5
  cfg.model.latent.enabled = True
  with pytest.raises(ConfigError, match="model.num_layers"):
    resolve(cfg)
  cfg.model.latent.inject_layer = 2
  assert resolve(cfg).model.latent.inject_layer == 2


def _run_train(*flags):
  return subprocess.run([sys.executable, "-m", "launch.train", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


BAD_OVERRIDES = [
    ("--config.model.no_such_key=1", "no_such_key"),
    ("--config.model.num_layers=3", "model.num_layers: must be even"),
    ("--config.model.latent.inject_layer=2", "model.latent.inject_layer"),
    ("--config.model.latent.kappa_bits=-0.5", "model.latent.kappa_bits: must be >= 0"),
    ("--config.model.latent.num_bits=0", "model.latent.num_bits"),
    ("--config.model.latent.num_bits=25", "model.latent.num_bits"),
    ("--config.model.num_heads=5", "model.num_heads: must divide model.d_model"),
    ("--config.model.num_kv_heads=3", "model.num_kv_heads: must divide model.num_heads"),
    ("--config.model.latent.kappa=0.1", "set exactly one of model.latent.kappa"),
    ("--config.model.remat_policy=sometimes", "model.remat_policy"),
    ("--config.model.dtype=float8", "model.dtype"),
    ("--config.model.seq_len=100", "model.seq_len"),
    ("--config.train.warmup_steps=100000", "train.warmup_steps"),
    ("--config.mesh.data=0", "mesh.data"),
    ("--config.data.name=imagenet", "data.name"),
    ("--config.model.num_layers=two", "num_layers"),
    ("--config.train.batchsize=3", 'unknown key batchsize: Did you mean "batch_size"'),
    ("--config.model.latent.encoder_rope=False", "model.latent.encoder_rope"),
    ("--config.model.latent.num_bits=24", "post_sampler=bits"),
    ("--config.model.attention_impl=flash", "model.attention_impl"),
    ("--config.model.param_dtype=int8", "model.param_dtype"),
    ("--config.train.grad_accum_steps=3", "train.grad_accum_steps"),
    ("--config.data.mixture=hdfs://cluster/web:0.7,data/code:0.3",
     "data.mixture: hdfs://cluster/web: only local paths, gs:// and s3://"),
    ("--config.data.data_dir=gs://bucket/tfds", "data.data_dir: gs://bucket/tfds is a URL"),
]


@pytest.mark.parametrize("override,message", BAD_OVERRIDES)
def test_config_errors_exit_2_with_one_line(override, message, tmp_path):
  result = _run_train("--config=experiments/tiny.py", f"--workdir={tmp_path}", override)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
  assert not os.listdir(tmp_path)  # nothing was written


def test_missing_config_file_and_workdir(tmp_path):
  result = _run_train("--config=experiments/nope.py", f"--workdir={tmp_path}")
  assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
  result = _run_train("--config=experiments/tiny.py")
  assert result.returncode == 2 and "--workdir" in result.stderr


def test_config_error_names_the_key():
  cfg = default_config()
  cfg.model.latent.kappa_bits = 0.5
  cfg.model.seq_len = 66
  cfg.model.d_model = 130
  with pytest.raises(ConfigError) as e:
    resolve(cfg)
  assert e.value.key == "model.num_heads"


def test_end_of_run_hook_is_a_module_and_function_that_import():
  from experiments import tiny
  from ftjax import configs, zdiag
  cfg = tiny.get_config()
  assert configs.end_of_run_hook(resolve(cfg).train) is zdiag.shared_z_report
  cfg.train.end_of_run = "ftjax.zdiag.shared_z_report"
  with pytest.raises(ConfigError, match="train.end_of_run: must be 'module:function'"):
    resolve(cfg)
  cfg.train.end_of_run = "ftjax.zdiag:no_such_hook"
  with pytest.raises(ConfigError, match="train.end_of_run: cannot import"):
    configs.end_of_run_hook(resolve(cfg).train)
  cfg.train.end_of_run = ""
  assert configs.end_of_run_hook(resolve(cfg).train) is None


def test_attention_impl_help_names_every_value_and_what_auto_picks():
  from ftjax import layers
  from ftjax.configs import ATTENTION_IMPLS, key_help
  comment = {key: text for key, _, text in key_help()}["model.attention_impl"]
  assert all(f'"{impl}"' in comment for impl in ATTENTION_IMPLS)
  auto = comment.split(";")[0]
  for backend in ("gpu", "tpu", "cpu"):
    assert f'"{layers.resolve_attention_impl("auto", "bfloat16", 64, backend)}"' in auto, backend


def test_config_help_lists_every_key_with_a_comment():
  result = _run_train("--config_help")
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert len(lines) == len(_flat_keys(default_config()))
  assert any(l.startswith("train.grad_accum_steps") and "Microbatches" in l for l in lines)
  assert all(len(l.split(None, 2)) == 3 for l in lines), [l for l in lines if len(l.split()) < 3]
