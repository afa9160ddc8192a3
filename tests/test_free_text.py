"""The free_text sweep's arms, the importance-weighted bound against brute force over
every code sequence, and the pre-registered decision rule on fabricated run files."""

import csv
import functools
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import free_text, free_text_results, text_sweep
from ftjax import iw_bound, latent
from ftjax.configs import resolve, with_overrides
from ftjax.model import make_model
from ftjax.train import init_params
from launch.sweep import point_name

LOG2 = math.log(2)


def _arm_configs(seed):
  return [resolve(with_overrides(free_text.get_config(), p)) for p in free_text.arm_points(seed)]


def test_points_are_the_protocols_arms_with_stable_names():
  names = [point_name(p) for p in free_text.get_sweep()]
  assert names[:4] == ["seed=0,enabled=False,num_layers=5", "seed=0,enabled=False",
                       "seed=0,target_bits=0.0625", "seed=0,target_bits=0.25"]
  assert len(names) == len(set(names)) == 24
  base = resolve(text_sweep.get_config())
  shape = lambda cfg: {k: v for k, v in cfg.model.items() if k not in ("latent", "num_layers")}
  for seed in free_text.SEEDS:
    a, d, b, c = _arm_configs(seed)
    assert (a.model.num_layers, d.model.num_layers, b.model.num_layers) == (5, 4, 4)
    assert not a.model.latent.enabled and not d.model.latent.enabled
    for ft, target in ((b, 1 / 16), (c, 1 / 4)):
      lat = ft.model.latent
      assert (lat.post_sampler, lat.zero_init_post_sampler, lat.kl_control, lat.target_bits,
              lat.control_beta_init, lat.num_bits) == ("bits", False, "target_rate", target,
                                                       0.01, base.model.latent.num_bits)
    for cfg in (a, d, b, c):
      assert shape(cfg) == shape(base) and cfg.data == base.data and cfg.seed == seed
      assert (cfg.train.steps, cfg.train.eval_batches, cfg.train.lr, cfg.train.batch_size) == (
          1000, 32, base.train.lr, base.train.batch_size)


def test_arms_of_a_seed_share_train_and_eval_batches_and_eval_keys():
  """The streams depend on data.*, model.seq_len, train.batch_size and the seed, the eval keys on
  the seed: equal across the arms of a seed (and the same batches, read for seed 0)."""
  from ftjax.data import make_source
  for seed in free_text.SEEDS:
    cfgs = _arm_configs(seed)
    for cfg in cfgs[1:]:
      assert cfg.data == cfgs[0].data and cfg.train == cfgs[0].train
      assert (cfg.seed, cfg.model.seq_len) == (cfgs[0].seed, cfgs[0].model.seq_len)
  a, _, b, _ = _arm_configs(0)
  for split in ("train", "validation"):
    first = [next(make_source(cfg).stream(split, 4, slice(None), 0, 1)) for cfg in (a, b)]
    for key in first[0]:
      np.testing.assert_array_equal(first[0][key], first[1][key])


# --- the importance-weighted bound on a tiny FT: H = 2 bits, 3 tokens (4^3 code sequences) ---

H, T, B = 2, 3, 4


@pytest.fixture(scope="module")
def tiny_ft():
  """(model, params, batch): random weights, the post-sampler scaled up so that Z matters to the
  decoder."""
  from experiments import tiny
  cfg = tiny.get_config()
  cfg.model.latent.num_bits = H
  cfg.model.latent.post_sampler, cfg.model.latent.zero_init_post_sampler = "bits", False
  model_cfg = resolve(cfg).model
  model_cfg.unlock()
  model_cfg.seq_len = T  # the synthetic task's check wants 66; the model takes any length
  model = make_model(model_cfg)
  params = jax.jit(lambda: init_params(model, 0))()
  params["latent"]["post_sampler"] *= 4.0
  tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, cfg.model.vocab_size)
  return model, params, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@functools.partial(jax.jit, static_argnums=0)
def _log_px_given_z_B(model, params, batch, codes_BT):
  """Σ_t log p(x_t | x_<t, z) per row, from the logits (a log-softmax, not the library's CE)."""
  logits_BTV, _ = model.apply({"params": params}, batch["inputs"], z_mode="given",
                              codes_BT=codes_BT)
  log_p_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  return jnp.sum(jnp.take_along_axis(log_p_BTV, batch["targets"][..., None], -1)[..., 0], -1)


@functools.partial(jax.jit, static_argnums=0)
def _encoder_sample(model, params, batch, key):
  """(codes_BT, logits_BTH) of the encoder's sample drawn with `key`."""
  _, aux = model.apply({"params": params}, batch["inputs"], z_mode="encoder", latent_key=key)
  return aux["codes_BT"], aux["latent_logits_BTH"]


def _log_q_B(logits_BTH, codes_BT):
  """log q(z | x) from the probability table of every code (latent.code_probs)."""
  g_NC = latent.code_probs(logits_BTH.reshape(-1, H))
  return jnp.sum(jnp.log(g_NC[jnp.arange(B * T), codes_BT.reshape(-1)]).reshape(B, T), -1)


@pytest.fixture(scope="module")
def exact(tiny_ft):
  """Brute force over all 4^T code sequences, per row: log p(x), the ELBO E_q[log p(x|z)] − KL
  and χ² = Var_q(w) / p(x)², the relative variance of one importance weight."""
  model, params, batch = tiny_ft
  _, logits_BTH = _encoder_sample(model, params, batch, jax.random.key(0))
  codes_ZT = jnp.array(list(itertools.product(range(2**H), repeat=T)), jnp.int32)
  z = codes_ZT.shape[0]
  every = {k: jnp.tile(v, (z, 1)) for k, v in batch.items()}  # row z·B + b: row b, codes z
  log_px_z_ZB = _log_px_given_z_B(model, params, every,
                                  jnp.repeat(codes_ZT, B, axis=0)).reshape(z, B)
  log_q_ZB = jax.vmap(lambda c_T: _log_q_B(logits_BTH, jnp.tile(c_T, (B, 1))))(codes_ZT)
  log_prior = -T * H * LOG2
  log_px_B = jax.nn.logsumexp(log_px_z_ZB, axis=0) + log_prior
  log_pxz_ZB = log_px_z_ZB + log_prior
  elbo_B = jnp.sum(jnp.exp(log_q_ZB) * (log_pxz_ZB - log_q_ZB), axis=0)
  chi2_B = jnp.sum(jnp.exp(2 * (log_pxz_ZB - log_px_B) - log_q_ZB), axis=0) - 1
  assert float(jnp.min(jnp.std(log_px_z_ZB, axis=0))) > 0.1  # Z matters to the decoder
  return np.asarray(log_px_B), np.asarray(elbo_B), np.asarray(chi2_B)


def test_log_weight_of_one_sample_matches_the_naive_formula(tiny_ft):
  model, params, batch = tiny_ft
  key = jax.random.key(7)
  codes_BT, logits_BTH = _encoder_sample(model, params, batch, key)
  want_B = (_log_px_given_z_B(model, params, batch, codes_BT) - T * H * LOG2
            - _log_q_B(logits_BTH, codes_BT))
  got_B = jax.jit(iw_bound.log_weight_B, static_argnums=0)(model, params, batch, key)
  np.testing.assert_allclose(got_B, want_B, rtol=1e-5, atol=1e-4)


def _sampled_log_w_KB(tiny_ft, key, k):
  """log_weight_B at the keys jax.random.split(key, k), vmapped (one batched forward)."""
  model, params, batch = tiny_ft
  return jax.jit(jax.vmap(lambda key: iw_bound.log_weight_B(model, params, batch, key)))(
      jax.random.split(key, k))


def test_log_weights_are_the_samples_of_the_split_keys(tiny_ft):
  model, params, batch = tiny_ft
  got_KB = iw_bound.log_weights_KB(params, batch, jax.random.key(5), model=model, num_samples=8)
  np.testing.assert_allclose(got_KB, _sampled_log_w_KB(tiny_ft, jax.random.key(5), 8),
                             rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def log_w_KB(tiny_ft):
  return np.asarray(_sampled_log_w_KB(tiny_ft, jax.random.key(3), 4096))


def test_one_sample_is_the_elbo_in_expectation(log_w_KB, exact):
  _, elbo_B, _ = exact
  sem_B = log_w_KB.std(0) / math.sqrt(log_w_KB.shape[0])
  assert np.all(np.abs(log_w_KB.mean(0) - elbo_B) < 4 * sem_B)


def test_bound_rises_with_k_and_meets_the_exact_likelihood(log_w_KB, exact):
  log_px_B, elbo_B, chi2_B = exact
  assert np.all(elbo_B < log_px_B - 0.2)  # a gap for the IW bound to close
  groups_RKB = jnp.asarray(log_w_KB).reshape(256, 16, B)  # 256 independent sets of 16 samples
  mean_iw = {k: np.asarray(jnp.mean(jax.vmap(lambda w: iw_bound.iw_bound_B(w, k))(groups_RKB),
                                    0)) for k in (1, 4, 16)}
  assert np.all(mean_iw[1] < mean_iw[4]) and np.all(mean_iw[4] < mean_iw[16])
  assert np.all(mean_iw[16] <= log_px_B + 1e-3)
  # IW_K − log p(x) ≈ log(mean of K weights / p): its std is √(χ²/K), its bias −χ²/(2K)
  k = log_w_KB.shape[0]
  err_B = np.asarray(iw_bound.iw_bound_B(jnp.asarray(log_w_KB), k)) - log_px_B
  assert np.all(np.abs(err_B) < 4 * np.sqrt(chi2_B / k) + chi2_B / (2 * k))
  assert np.all(4 * np.sqrt(chi2_B / k) < 0.1)


# --- the decision rule, on fabricated run files (a tmp dir; not results) ---

def _fake_run(root, arm, seed, bpb, z_use=0.0, steps=1000):
  """A run directory of `arm` with one eval row at its last step (FT: KL 0.1 nats per token)."""
  ft = arm in "bc"
  cfg = {"seed": seed, "data": {"name": "shakespeare"}, "train": {"steps": steps},
         "model": {"num_layers": 5 if arm == "a" else 4,
                   "latent": {"enabled": ft, "post_sampler": "bits", "kappa": 0.0,
                              "target_bits": free_text.TARGET_BITS["bc".index(arm)] if ft
                              else 0.25}}}
  workdir = os.path.join(root, f"{arm}{seed}")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(cfg, f)
  row = {"step": steps, "eval_ce": bpb * LOG2, "eval_bpb": bpb, "eval_elbo_bpb": bpb + 0.1}
  if ft:
    row.update(eval_kl=0.1, eval_z_use=z_use)
    with open(os.path.join(workdir, free_text.IW_FILE), "w") as f:
      json.dump({"step": steps, "iw16_bpb": bpb + 0.05, "iw1_bpb": bpb + 0.1}, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": steps, "loss": 1.0}) + "\n" + json.dumps(row) + "\n")


def _csv_rows(path):
  with open(path, encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _fake_sweep(root, diff_b, diff_c, z_use_b, z_use_c):
  for s in free_text.SEEDS:
    control = 2.40 + 0.01 * s
    _fake_run(root, "a", s, control)
    _fake_run(root, "d", s, control + 0.03)
    _fake_run(root, "b", s, control + diff_b[s], z_use_b[s])
    _fake_run(root, "c", s, control + diff_c[s], z_use_c[s])


def _verdicts(tmp_path, name, *sweep):
  root, out = tmp_path / name, tmp_path / f"{name}_out"
  _fake_sweep(root, *sweep)
  free_text_results.main([f"--root={root}", f"--out={out}", "--device=fabricated"])
  text = (out / "decision.md").read_text()
  return {line[2:5]: line for line in text.splitlines() if line.startswith("- (")}, out


def test_rule_free_and_tax(tmp_path):
  diff_b = [0.001, -0.002, 0.003, 0.0, 0.002, -0.001]
  verdicts, out = _verdicts(tmp_path, "r1", diff_b, [0.05, 0.06, 0.04, 0.055, 0.045, 0.05],
                            [0.02] * 6, [0.3] * 6)
  assert "free at this scale" in verdicts["(b)"]
  assert "tax of +0.0500 bpb" in verdicts["(c)"]
  half = free_text_results.T975[5] * np.std(diff_b, ddof=1) / math.sqrt(6)
  arms = {r["arm"][:3]: r for r in _csv_rows(out / "arms.csv")}
  assert float(arms["(b)"]["diff_high"]) == pytest.approx(np.mean(diff_b) + half)
  assert float(arms["(d)"]["diff_mean"]) == pytest.approx(0.03)
  runs = {r["run"]: r for r in _csv_rows(out / "runs.csv")}
  assert float(runs["c0"]["kl_recovered"]) == pytest.approx(3.0)  # 0.3 nats of Z use / 0.1 KL
  assert float(runs["b0"]["iw16_bpb"]) == pytest.approx(2.451)


def test_rule_not_reading_z_and_inconclusive(tmp_path):
  verdicts, _ = _verdicts(tmp_path, "r2", [0.0] * 6, [0.02, -0.01, 0.03, -0.02, 0.01, 0.0],
                          [0.02, 0.02, 0.02, 0.02, 0.009, 0.0], [0.01] * 6)
  assert "does not read Z (4 of 6 seeds" in verdicts["(b)"]
  assert "inconclusive (95 % CI [-" in verdicts["(c)"]


def test_rule_needs_every_seed_and_every_iw_file(tmp_path):
  root = tmp_path / "r3"
  _fake_sweep(root, [0.0] * 6, [0.0] * 6, [0.02] * 6, [0.02] * 6)
  runs = [free_text_results.read_run(str(root / n))[0] for n in sorted(os.listdir(root))]
  runs = [r for r in runs if r["run"] != "c5"]
  c = {r["arm"][:3]: r for r in free_text_results.arms(runs)}["(c)"]
  assert c["verdict"].startswith("incomplete: 5 of 6 paired seeds")
  os.remove(root / "b0" / free_text.IW_FILE)
  with pytest.raises(SystemExit):
    free_text_results.main([f"--root={root}", f"--out={tmp_path / 'r3_out'}"])


# --- training time at fixed κ: studies at several checkpoints of one run (experiments/kappa_time.py) ---

def test_kappa_time_points():
  from experiments import kappa_time
  names = [point_name(p) for p in kappa_time.get_sweep()]
  assert names == [f"seed={s},kappa_bits={k}" for s in (0, 1, 2) for k in (0.25, 1)]
  cfg = resolve(with_overrides(kappa_time.get_config(), kappa_time.get_sweep()[0]))
  assert (cfg.model.latent.post_sampler, cfg.model.latent.num_bits, cfg.train.steps) == (
      "bits", 16, 3000)
  assert cfg.checkpoint.every_steps == cfg.checkpoint.keep_period == 1000


def test_kappa_time_studies_at_kept_steps(tmp_path, monkeypatch):
  from experiments import kappa_time, tiny
  from ftjax import loop
  from ftjax.trainer import Trainer
  monkeypatch.setattr(kappa_time, "STUDY_STEPS", (2, 4))
  monkeypatch.setattr(kappa_time, "STUDY_Z", (2, 2))
  monkeypatch.setattr(kappa_time, "SHARED_Z", (2, 2))
  c = tiny.get_config()
  c.model.latent.post_sampler, c.model.latent.zero_init_post_sampler = "bits", False
  c.train.steps, c.train.num_samples = 4, 0
  c.checkpoint.every_steps = c.checkpoint.keep_period = 2
  cfg, workdir = resolve(c), str(tmp_path / "run")
  trainer = Trainer.create(cfg, run_dir=workdir)
  state = loop.train_and_evaluate(cfg, workdir, log=lambda *_: None, trainer=trainer)
  kappa_time.after_point(trainer, state, workdir)
  for step in (2, 4):
    with open(os.path.join(workdir, f"zstudy_{step}.json")) as f:
      assert json.load(f)["step"] == step
    with open(os.path.join(workdir, f"shared_z_{step}.json")) as f:
      shared = json.load(f)
    assert shared["step"] == step and set(shared["tests"]) == {"position", "distance", "noise"}
  same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), state.params,
                                kappa_time.params_at(trainer, workdir, 4))
  assert all(jax.tree_util.tree_leaves(same))
  assert not jnp.all(state.params["embed"] == kappa_time.params_at(trainer, workdir, 2)["embed"])


# --- the training-time study's stages and rules, on fabricated run files (not results) ---

def _sample(start, broken=False):
  """A decoded 'A>body' sample with its block at `start` (broken: the block is missing)."""
  body = ["_"] * 64
  if not broken:
    body[start:start + 8] = "A" * 8
  return "A>" + "".join(body)


def _fake_time_run(root, seed, kappa_bits, stages):
  """A kappa_time run whose studied steps show `stages` (one per step, by the protocol's tests)."""
  p = {"nothing": (0.5, 0.5, 0.5, 0.0), "position": (0.001, 0.2, 0.5, 0.1),
       "noise": (0.3, 0.04, 0.001, 0.1), NO_POS: (0.5, 0.5, 0.001, 0.1),
       "broken": (0.001, 0.001, 0.001, 0.1)}
  workdir = os.path.join(root, f"seed={seed},kappa_bits={kappa_bits}")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"seed": seed, "train": {"steps": 3000},
               "model": {"latent": {"enabled": True, "post_sampler": "bits",
                                    "kappa": kappa_bits * LOG2}}}, f)
  rows = []
  for step, name in zip((1000, 2000, 3000), stages):
    pos_p, dist_p, noise_p, z_use = p[name]
    rows.append({"step": step, "eval_ce": 0.4, "eval_elbo": 0.5, "eval_kl": 0.1,
                 "eval_z_use": z_use + 0.001 * seed})
    texts = [_sample(i % 57, broken=(name == "broken" and i % 4)) for i in range(64)]
    with open(os.path.join(workdir, f"zstudy_{step}.json"), "w") as f:
      json.dump({"step": step, "uniform_texts": texts, "well_formed_uniform": 1.0}, f)
    with open(os.path.join(workdir, f"shared_z_{step}.json"), "w") as f:
      json.dump({"step": step, "tests": {"position": [0.2 + step / 1e5, 0.1, pos_p],
                                         "distance": [3.0, 9.0, dist_p],
                                         "noise": [0.1, 0.05, noise_p]}}, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))


NO_POS = "reads Z, no shared position"


def test_kappa_time_stages_moves_along_and_changes(tmp_path):
  from experiments import kappa_time_results as ktr
  root, out = tmp_path / "kt", tmp_path / "kt_out"
  runs = {(0, 0.25): ("nothing", "position", "noise"), (1, 0.25): ("position", "position", "noise"),
          (2, 0.25): ("position", "position", "position"),
          (0, 1): ("noise", "position", "broken"), (1, 1): ("position", NO_POS, "noise"),
          (2, 1): ("nothing", "noise", "broken")}
  for (seed, kappa), stages in runs.items():
    _fake_time_run(root, seed, kappa, stages)
  ktr.main([f"--root={root}", f"--out={out}", "--draws=50"])
  steps = _csv_rows(out / "steps.csv")
  assert [(int(r["seed"]), float(r["kappa_bits"]), r["stage"]) for r in steps] == [
      (s, k, st) for (s, k), stages in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0]))
      for st in stages]
  assert {r["near_0.05"] for r in steps if r["stage"] == "noise"} == {"position/distance p = 0.0400"}
  moving = {(int(r["seed"]), float(r["kappa_bits"])): r["moves_along"] for r in
            _csv_rows(out / "runs.csv")}
  assert moving == {(0, 0.25): "True", (1, 0.25): "True", (2, 0.25): "False",
                    (0, 1.0): "False", (1, 1.0): "False", (2, 1.0): "True"}
  summary = (out / "summary.md").read_text()
  assert "κ = 0.25 bit: moves along with training time (2 of 3 seeds)" in summary
  assert "κ = 1 bit: does not move along with training time (1 of 3 seeds)" in summary
  change = {(float(c["kappa_bits"]), c["measure"]): c for c in _csv_rows(out / "changes.csv")}
  z = change[(0.25, "eval_z_use")]  # 0.1, 0.0, 0.0 (+0.001 × seed, which cancels)
  half = ktr.t_interval([0.1, 0.0, 0.0])
  assert float(z["mean"]) == pytest.approx(0.1 / 3) and float(z["high"]) == pytest.approx(half[2])
  assert z["inside_noise"] == "True"
  pos = change[(1.0, "position_within_minus_across")]  # +0.02 in every run: no spread
  assert float(pos["mean"]) == pytest.approx(0.02) and pos["inside_noise"] == "False"
  assert float(change[(1.0, "uniform_strict_well_formed")]["mean"]) < 0


def test_kappa_time_results_incomplete_and_check(tmp_path):
  from experiments import kappa_time_results as ktr
  root, out = tmp_path / "kt", tmp_path / "kt_out"
  _fake_time_run(root, 0, 1, ("position", "noise", "noise"))
  os.remove(root / "seed=0,kappa_bits=1" / "shared_z_3000.json")
  earlier = tmp_path / "earlier.json"
  earlier.write_text(json.dumps({"runs": [
      {"run": "seed=0,post_sampler=bits,kappa_bits=1", "seed": 0, "kappa_bits": 1.0,
       "post_sampler": "bits", "kl_control": "free_bits", "eval_step": 3000, "eval_ce": 0.39,
       "eval_elbo": 0.5, "eval_kl_bits": 0.1 / LOG2, "eval_z_use": 0.1}]}))
  ktr.main([f"--root={root}", f"--out={out}", "--draws=50", f"--check={earlier}"])
  run, = _csv_rows(out / "runs.csv")
  assert (run["stage_3000"], run["complete"], run["moves_along"]) == ("", "False", "False")
  assert "κ = 1 bit: incomplete: 0 of 3 runs" in (out / "summary.md").read_text()
  check, = _csv_rows(out / "check.csv")
  assert float(check["eval_ce_diff"]) == pytest.approx(0.01)
  assert float(check["eval_kl_bits_diff"]) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(SystemExit):
    ktr.main([f"--root={tmp_path / 'missing'}", f"--out={out}"])
