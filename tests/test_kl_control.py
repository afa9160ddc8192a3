"""κ as a traced value of the train state, the target-rate KL controller, the Z diagnostics and
the in-process sweep that reuses compiled steps."""

import itertools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import configs, loop, train, zdiag
from ftjax.trainer import Trainer
from tests.conftest import REPO, resolved

TIMING_KEYS = ("tokens_per_sec", "mfu")
TARGET = {"model.latent.kl_control": "target_rate", "model.latent.target_bits": 0.5,
          "model.latent.control_ki": 0.2}


def _quiet(*_):
  pass


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def test_kappa_is_traced_one_compile_for_every_kappa(tiny_cfg):
  cfg = resolved(tiny_cfg, **{"train.peak_flops": 1.0})
  trainer = Trainer.create(cfg)
  batch = trainer.batch(0)
  losses = []
  for kappa_bits in (0.0, 0.25, 2.0):
    lat = resolved(cfg, **{"model.latent.kappa": None, "model.latent.kappa_bits": kappa_bits})
    state = train.set_latent_targets(trainer.init_state(), lat.model.latent,
                                     trainer.state_sharding)
    _, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert trainer._train_step._cache_size() == 1  # noqa: SLF001  (no recompile across κ)
  assert losses[0] > losses[1] >= losses[2]  # the hinge: less penalty as κ grows


def test_reused_trainer_gives_the_same_run_as_a_fresh_one(tiny_cfg, tmp_path):
  """launch.sweep --in_process: a run on compiled steps built for another κ equals a fresh run."""
  base = {"train.peak_flops": 1.0, "train.num_samples": 0}
  cfg_a = resolved(tiny_cfg, **base)
  cfg_b = resolved(tiny_cfg, **base, **{"model.latent.kappa": None,
                                        "model.latent.kappa_bits": 0.05})
  trainer = Trainer.create(cfg_a)
  loop.train_and_evaluate(cfg_a, str(tmp_path / "a"), log=_quiet, trainer=trainer)
  loop.train_and_evaluate(cfg_b, str(tmp_path / "b"), log=_quiet, trainer=trainer)
  assert trainer._train_step._cache_size() == 1  # noqa: SLF001
  loop.train_and_evaluate(cfg_b, str(tmp_path / "fresh"), log=_quiet)
  assert _metrics(tmp_path / "b") == _metrics(tmp_path / "fresh")
  assert _metrics(tmp_path / "a") != _metrics(tmp_path / "b")
  assert _metrics(tmp_path / "b")[0]["step"] == 1  # the first step (initial parameters) is logged


def test_the_target_rate_is_held_in_nats(tiny_cfg):
  lat = resolved(tiny_cfg, **TARGET).model.latent
  assert train.target_nats(lat) == pytest.approx(0.5 * math.log(2))
  assert float(train.latent_ctl_init(lat)["target"]) == pytest.approx(0.5 * math.log(2))
  assert train.target_nats(tiny_cfg.model.latent) == 0.0  # free bits: no target


def test_target_rate_controller_logs_and_resumes_bit_identically(tiny_cfg, tmp_path):
  cfg = resolved(tiny_cfg, **{"train.peak_flops": 1.0, "train.num_samples": 0,
                              "train.log_every": 1, **TARGET})
  full = loop.train_and_evaluate(cfg, str(tmp_path / "full"), log=_quiet)
  loop.train_and_evaluate(cfg, str(tmp_path / "resumed"), log=_quiet, stop_at=10)
  resumed = loop.train_and_evaluate(cfg, str(tmp_path / "resumed"), log=_quiet)
  jax.tree_util.tree_map(np.testing.assert_array_equal, full.params, resumed.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, full.latent_ctl, resumed.latent_ctl)
  rows = [r for r in _metrics(tmp_path / "full") if "kl_beta" in r]
  assert len(rows) == cfg.train.steps  # logged every step here (log_every=1)
  betas = [r["kl_beta"] for r in rows]
  warm = cfg.train.warmup_steps
  assert all(b == 1.0 for b in betas[:warm])  # held during the warm-up
  assert len(set(betas[warm:])) > 1
  lat = cfg.model.latent
  assert all(lat.control_beta_min <= b <= lat.control_beta_max for b in betas)
  np.testing.assert_allclose(rows[0]["kl_target"], 0.5 * math.log(2), rtol=1e-6)


def test_controller_update_direction_and_clamp(tiny_cfg):
  lat = resolved(tiny_cfg, **TARGET).model.latent
  ctl = train.latent_ctl_init(lat)
  target = float(ctl["target"])
  up = train.update_latent_ctl(ctl, jnp.float32(3 * target), 0, lat, start_step=0)
  down = train.update_latent_ctl(ctl, jnp.float32(0.0), 0, lat, start_step=0)
  held = train.update_latent_ctl(ctl, jnp.float32(3 * target), 0, lat, start_step=2)
  assert float(up["beta"]) > 1.0 > float(down["beta"]) and float(held["beta"]) == 1.0
  for _ in range(2000):
    up = train.update_latent_ctl(up, jnp.float32(100.0), 5, lat, start_step=2)
  np.testing.assert_allclose(float(up["beta"]), lat.control_beta_max, rtol=1e-5)


def test_kl_control_config_errors(tiny_cfg):
  with pytest.raises(configs.ConfigError, match="model.latent.target_bits"):
    resolved(tiny_cfg, **{"model.latent.kl_control": "target_rate"})
  with pytest.raises(configs.ConfigError, match="model.latent.kl_control"):
    resolved(tiny_cfg, **{"model.latent.kl_control": "beta"})
  with pytest.raises(configs.ConfigError, match="model.latent.control_beta_init"):
    resolved(tiny_cfg, **{"model.latent.control_beta_min": 2.0})


def test_z_diagnostics_against_enumeration():
  """Exact I(X; Z) over the tokens by enumerating the 2^H codes: the per-bit bound is above it,
  below the mean KL, and the Monte-Carlo estimate is close for well-separated posteriors."""
  h, n = 4, 64
  rng = np.random.default_rng(0)
  centres = rng.normal(0, 4, (4, h))
  logits_NH = centres[rng.integers(0, 4, n)] + rng.normal(0, 0.3, (n, h))
  codes_N = (rng.random((n, h)) < 1 / (1 + np.exp(-logits_NH))).astype(np.int64)
  codes_N = (codes_N << np.arange(h)).sum(-1)
  out = jax.device_get(zdiag.diagnostics(jnp.asarray(logits_NH[None], jnp.float32),
                                         jnp.asarray(codes_N[None], jnp.int32),
                                         jnp.ones((1, n))))
  all_bits = np.array(list(itertools.product([0, 1], repeat=h)))[:, ::-1]  # code k's bits
  p = 1 / (1 + np.exp(-logits_NH))
  q_NC = np.prod(np.where(all_bits[None] == 1, p[:, None], 1 - p[:, None]), axis=-1)
  agg_C = q_NC.mean(0)
  exact_mi = np.mean(np.sum(q_NC * (np.log(q_NC) - np.log(agg_C)[None]), axis=1))
  kl = np.mean(np.sum(q_NC * np.log(q_NC * 2**h), axis=1))
  per_bit = [out[f"kl_bit{i:02d}"] for i in range(h)]
  np.testing.assert_allclose(sum(per_bit), kl, rtol=1e-4)
  assert exact_mi - 1e-5 <= out["mi_bits_bound"] <= kl + 1e-5
  assert abs(out["mi"] - exact_mi) < 0.25
  _, counts = np.unique(codes_N, return_counts=True)
  np.testing.assert_allclose(out["code_ppl"], np.exp(-np.sum(counts / n * np.log(counts / n))),
                             rtol=1e-4)
  assert out["active_bits"] == sum(v > zdiag.ACTIVE_BIT_NATS for v in per_bit)


def test_sweep_in_process_reuses_the_compiled_steps(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "launch.sweep", "--config=tests/sweep_kappa_tiny.py",
       f"--workdir={tmp_path}", "--in_process"], cwd=REPO, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("(compiling)") == 1
  assert result.stdout.count("(compiled steps reused)") == 1
  assert os.path.exists(tmp_path / "kappa_bits=1" / "after_point.txt")
  again = subprocess.run(
      [sys.executable, "-m", "launch.sweep", "--config=tests/sweep_kappa_tiny.py",
       f"--workdir={tmp_path}", "--in_process"], cwd=REPO, capture_output=True, text=True,
      timeout=600)
  assert again.returncode == 0 and again.stdout.count("finished, skipped") == 2
