"""Train step, eval step and the loop: reproducibility, learning, resume, the launcher."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from ftjax import loop, train
from ftjax.trainer import Trainer
from tests.conftest import REPO, resolved

TIMING_KEYS = ("tokens_per_sec", "mfu")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _quiet(*_):
  pass


def test_two_runs_give_bit_identical_metrics(tiny_cfg, tmp_path):
  cfg = resolved(tiny_cfg, **{"train.peak_flops": 1.0, "train.num_samples": 0})
  a = loop.train_and_evaluate(cfg, str(tmp_path / "a"), log=_quiet)
  b = loop.train_and_evaluate(cfg, str(tmp_path / "b"), log=_quiet)
  assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
  jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)
  names = set().union(*_metrics(tmp_path / "a"))
  assert {"loss", "ce", "kl", "kl_clipped", "kl_frac_above_kappa", "grad_norm", "lr", "eval_ce",
          "eval_elbo", "eval_kl"} <= names


def test_resumed_run_matches_uninterrupted(tiny_cfg, tmp_path):
  cfg = resolved(tiny_cfg, **{"train.peak_flops": 1.0, "train.num_samples": 0})
  full = loop.train_and_evaluate(cfg, str(tmp_path / "full"), log=_quiet)
  loop.train_and_evaluate(cfg, str(tmp_path / "resumed"), log=_quiet, stop_at=10)
  logs = []  # a host-side change (more frequent logs) keeps the parameters; it is reported
  changed = resolved(cfg, **{"train.log_every": cfg.train.log_every + 1})
  resumed = loop.train_and_evaluate(changed, str(tmp_path / "resumed"), log=logs.append)
  assert int(resumed.step) == cfg.train.steps
  jax.tree_util.tree_map(np.testing.assert_array_equal, full.params, resumed.params)
  assert ("the config differs from step 10's: train.log_every: "
          f"{cfg.train.log_every} → {cfg.train.log_every + 1}") in logs


def test_latent_samples_differ_per_step_and_repeat_per_key(tiny_cfg):
  trainer = Trainer.create(tiny_cfg)
  params = train.init_params(trainer.model, 0)
  batch = trainer.batch(0)

  def codes(step):
    _, aux = trainer.model.apply({"params": params}, batch["inputs"], z_mode="encoder",
                                 latent_key=train.step_key(tiny_cfg.seed, step))
    return np.asarray(aux["codes_BT"])

  assert not np.array_equal(codes(0), codes(1))
  np.testing.assert_array_equal(codes(3), codes(3))


def test_loss_falls_on_the_synthetic_task(tiny_cfg, tmp_path):
  cfg = resolved(tiny_cfg, **{"train.steps": 80, "train.batch_size": 8, "train.log_every": 2,
                              "train.eval_every": 80, "train.peak_flops": 1.0,
                              "train.num_samples": 0})
  loop.train_and_evaluate(cfg, str(tmp_path), log=_quiet)
  rows = [r for r in _metrics(tmp_path) if "ce" in r]
  assert rows[0]["ce"] > 1.5 and rows[-1]["ce"] < 0.8, rows
  assert [r for r in _metrics(tmp_path) if "eval_ce" in r][-1]["eval_ce"] < 0.8


def test_baseline_trains_and_reports_eval_ce(tiny_cfg, tmp_path):
  cfg = resolved(tiny_cfg, **{"model.latent.enabled": False, "train.peak_flops": 1.0,
                              "train.num_samples": 0})
  loop.train_and_evaluate(cfg, str(tmp_path), log=_quiet)
  rows = _metrics(tmp_path)
  assert "kl" not in rows[0] and rows[-1]["eval_ce"] == rows[-1]["eval_elbo"]


def test_eval_step_reports_uniform_z_ce_and_elbo(tiny_cfg):
  trainer = Trainer.create(tiny_cfg)
  params = train.init_params(trainer.model, 0)
  out = trainer.eval_step(params, trainer.batch(0, "validation"), jax.random.key(0))
  # never CE with encoder-inferred Z alone: besides the three, only the Z diagnostics
  assert {"eval_ce", "eval_elbo", "eval_kl"} <= set(out)
  assert all(k.startswith("eval_z_") for k in set(out) - {"eval_ce", "eval_elbo", "eval_kl",
                                                          "eval_tokens_sum"})
  assert float(out["eval_elbo"]) >= float(out["eval_kl"])
  h = tiny_cfg.model.latent.num_bits
  per_bit = [float(out[f"eval_z_kl_bit{i:02d}"]) for i in range(h)]
  np.testing.assert_allclose(sum(per_bit), float(out["eval_kl"]), rtol=1e-4)
  assert float(out["eval_z_active_bits"]) == sum(v > 0.01 for v in per_bit)
  # Σ_h I(X; B_h) is at most the mean KL; the Monte-Carlo I(X; Z) at most log(tokens used)
  assert -1e-6 <= float(out["eval_z_mi_bits_bound"]) <= float(out["eval_kl"]) + 1e-6
  assert float(out["eval_z_mi"]) <= np.log(1024) + 1e-4
  assert 1.0 <= float(out["eval_z_code_ppl_argmax"]) and 1.0 <= float(out["eval_z_code_ppl"])
  np.testing.assert_allclose(float(out["eval_z_use"]),
                             float(out["eval_ce"]) - float(out["eval_elbo"]) + float(out["eval_kl"]),
                             atol=1e-5)


def test_launcher_writes_run_files_and_samples(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=experiments/tiny.py",
       f"--workdir={os.path.relpath(tmp_path, REPO)}", "--config.train.peak_flops=1e9"],
      cwd=REPO, capture_output=True, text=True, timeout=300)  # a relative workdir, as users write
  assert result.returncode == 0, result.stderr[-3000:]
  assert "samples (Z uniform per token" in result.stdout and "well-formed:" in result.stdout
  assert "MFU" in result.stdout and "ETA" in result.stdout and "kl " in result.stdout
  assert "samples sharing a Z draw" in result.stdout and "permutation p = " in result.stdout
  assert "overlap of the '!' positions" in result.stdout
  assert "distance between block starts" in result.stdout
  for name in ("config.json", "metrics.jsonl", "tb", "checkpoints"):
    assert os.path.exists(tmp_path / name), name
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model"]["latent"]["num_bits"] == 4


def test_tied_embeddings_are_an_untied_model_with_unembed_set_to_the_embedding(tiny_cfg):
  """model.tie_embeddings: no unembed parameter, a N(0, 1/D) embedding; the loss equals the
  untied model's with unembed = embedᵀ, and the embedding's gradient is the sum of that
  model's embedding and unembed gradients."""
  import jax.numpy as jnp
  tied = Trainer.create(resolved(tiny_cfg, **{"model.tie_embeddings": True}))
  untied = Trainer.create(tiny_cfg)
  params_t = train.init_params(tied.model, 0)
  assert "unembed" not in params_t
  d = tiny_cfg.model.d_model
  assert abs(float(jnp.std(params_t["embed"])) * d**0.5 - 1) < 0.1
  params_u = {**params_t, "unembed": {"kernel": params_t["embed"].T}}
  batch = untied.batch(0)
  keys_B = train.row_keys(jax.random.key(0), jnp.arange(batch["inputs"].shape[0]))
  mask_BT = train.token_mask(batch)

  def loss_and_grad(model, params):
    fn = lambda p: train.loss_fn(p, batch, keys_B, model, mask_BT, jnp.sum(mask_BT))[0]
    return jax.value_and_grad(fn)(params)
  loss_t, grad_t = loss_and_grad(tied.model, params_t)
  loss_u, grad_u = loss_and_grad(untied.model, params_u)
  np.testing.assert_allclose(float(loss_t), float(loss_u), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad_t["embed"]),
                             np.asarray(grad_u["embed"] + grad_u["unembed"]["kernel"].T),
                             rtol=1e-4, atol=1e-6)
  logits_t, _ = tied.model.apply({"params": params_t}, batch["inputs"],
                                 latent_key=jax.random.key(1))
  logits_u, _ = untied.model.apply({"params": params_u}, batch["inputs"],
                                   latent_key=jax.random.key(1))
  np.testing.assert_allclose(np.asarray(logits_t), np.asarray(logits_u), rtol=1e-5, atol=1e-5)
