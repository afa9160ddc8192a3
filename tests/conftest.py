"""Test set-up (before jax imports): 8 fake CPU devices, fast compiles, the persistent cache."""

import os
import sys

# Tests compile far more than they run: LLVM's -O0 compiles the tiny models 2-4x faster.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# Subprocesses (launcher tests) share the persistent compilation cache through the environment.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402


@pytest.fixture
def tiny_cfg():
  """The resolved `tiny` experiment config (unlocked copy, so tests can change fields)."""
  from experiments import tiny
  from ftjax.configs import resolve
  cfg = resolve(tiny.get_config())
  cfg.unlock()
  return cfg


def resolved(cfg, **overrides):
  """`cfg` with dotted-key overrides, validated again."""
  from ftjax.configs import resolve, with_overrides
  return resolve(with_overrides(cfg, overrides))
