"""Hugging Face Llama import/export against the committed fixtures (tests/fixtures/: random
Llamas made by `transformers`, with the logits it computed). No torch needed; the live
comparison with `transformers` is in test_hf_live.py (slow)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import checkpoint, hf, integrity, run as run_lib
from ftjax.configs import resolve, with_overrides
from ftjax.model import make_model
from ftjax.trainer import load_run

from .conftest import REPO

FIXTURES = os.path.join(REPO, "tests", "fixtures")
UNTIED, TIED = os.path.join(FIXTURES, "llama_untied"), os.path.join(FIXTURES, "llama_tied_rope3")


def config_for(hf_dir, **overrides):
  from experiments import tiny
  base = with_overrides(tiny.get_config(), overrides)
  return resolve(hf.build_config(base, hf.read_config(hf_dir), overrides))


def logits(cfg, params, tokens, z_mode, seed=3):
  out, _ = make_model(cfg.model).apply({"params": params}, jnp.asarray(tokens), z_mode=z_mode,
                                       latent_key=jax.random.key(seed))
  return np.asarray(out)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """{(fixture, latent): (cfg, state, run_dir)}, each imported once."""
  out = {}
  for name, hf_dir in (("untied", UNTIED), ("tied", TIED)):
    for latent in (False, True):
      cfg = config_for(hf_dir, **{"model.latent.enabled": latent})
      run = str(tmp_path_factory.mktemp(f"{name}_{latent}"))
      out[name, latent] = (cfg, hf.import_run(hf_dir, run, cfg, log=lambda *_: None), run)
  return out


@pytest.mark.parametrize("name", ["untied", "tied"])
@pytest.mark.parametrize("latent", [False, True])
def test_imported_logits_equal_transformers(imported, name, latent):
  cfg, state, _ = imported[name, latent]
  expected = np.load(os.path.join(UNTIED if name == "untied" else TIED, "expected.npz"))
  assert int(state.step) == 0
  modes = ("uniform", "encoder") if latent else ("zero",)
  for mode in modes:  # the FT at step 0 computes the Llama whatever Z is (zero post-sampler)
    np.testing.assert_allclose(logits(cfg, state.params, expected["tokens"], mode),
                               expected["logits"], atol=1e-4, rtol=1e-4, err_msg=mode)
  if latent:
    assert float(jnp.abs(state.params["latent"]["post_sampler"]).max()) == 0.0
    assert float(jnp.abs(state.params["latent"]["zeta"]).max()) > 0  # freshly initialised


def test_import_into_a_sharded_mesh(tmp_path):
  """Loaded shard by shard into fsdp x tensor shardings: the same logits, arrays split."""
  cfg = config_for(UNTIED, **{"model.latent.enabled": True, "mesh.data": 2, "mesh.fsdp": 2,
                              "mesh.tensor": 2})
  state = hf.import_run(UNTIED, str(tmp_path / "run"), cfg, log=lambda *_: None)
  query = state.params["layers_lo"]["block"]["attn"]["query"]["kernel"]
  assert len(query.sharding.device_set) == 8
  assert query.addressable_shards[0].data.shape == (2, 16, 2, 8)  # layers, D/fsdp, N/tensor, E
  expected = np.load(os.path.join(UNTIED, "expected.npz"))
  np.testing.assert_allclose(logits(cfg, state.params, expected["tokens"], "uniform"),
                             expected["logits"], atol=1e-4, rtol=1e-4)


def test_config_mapping(imported):
  m = imported["tied", False][0].model
  assert (m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim) == (
      2, 32, 4, 1, 16, 48)
  assert m.rope_theta == 500_000.0 and m.rope_scaling.type == "llama3"
  assert m.rope_scaling.original_max_position_embeddings == 16
  assert imported["untied", False][0].model.rope_scaling.type == "none"


def test_llama3_rope_scaling_is_what_matches(imported):
  """Without the rescaling the tied/llama3 fixture's logits are far off: the test above sees it."""
  cfg, state, _ = imported["tied", False]
  cfg = with_overrides(cfg, {"model.rope_scaling.type": "none"})
  expected = np.load(os.path.join(TIED, "expected.npz"))
  assert np.abs(logits(cfg, state.params, expected["tokens"], "zero") -
                expected["logits"]).max() > 1e-2


def test_run_directory(imported):
  cfg, _, run = imported["untied", True]
  for name in ("config.json", "config.py", hf.HF_CONFIG_FILE, "checkpoints"):
    assert os.path.exists(os.path.join(run, name)), name
  assert sorted(os.listdir(os.path.join(run, hf.TOKENIZER_DIR))) == [
      "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
  tok = hf.run_tokenizer(run)
  assert tok.decode(tok.encode("the cat sat on the mat")) == "the cat sat on the mat"
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  trainer, state = load_run(run)
  assert trainer.cfg.model.to_dict() == cfg.model.to_dict()
  chex = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), state.params,
                                imported["untied", True][1].params)
  assert all(jax.tree_util.tree_leaves(chex))


def test_damaged_run_files_are_refused(imported, tmp_path):
  """The run's tokenizer and configs are listed in run_checksums.json; a changed file (here one
  still readable, so nothing else would notice) is refused with a line naming it."""
  run = str(tmp_path / "run")
  shutil.copytree(imported["untied", False][2], run)
  listed = integrity.read_checked(os.path.join(run, run_lib.RUN_CHECKSUMS))
  assert sorted(listed) == ["config.json", hf.HF_CONFIG_FILE, "hf_tokenizer/generation_config.json",
                            "hf_tokenizer/tokenizer.json", "hf_tokenizer/tokenizer_config.json"]
  path = os.path.join(run, hf.TOKENIZER_DIR, "tokenizer.json")
  text = open(path, encoding="utf-8").read()
  open(path, "w", encoding="utf-8").write(text.replace('"cat"', '"cut"', 1))
  with pytest.raises(checkpoint.CheckpointError, match=r"tokenizer.json is damaged"):
    load_run(run)
  load_run(run, verify=False)  # the user's choice: not checked
  os.remove(path)
  with pytest.raises(checkpoint.CheckpointError, match=r"tokenizer.json is missing"):
    load_run(run)
  open(os.path.join(run, run_lib.RUN_CHECKSUMS), "a").write(" ")
  with pytest.raises(checkpoint.CheckpointError, match=r"run_checksums.json is damaged"):
    load_run(run)


def _tensors(directory):
  ckpt = hf.Checkpoint(directory)
  return {n: np.asarray(ckpt.get(n)) for n in ckpt.names()}


def test_export_baseline_gives_the_imported_tensors(imported, tmp_path):
  for name, hf_dir in (("untied", UNTIED), ("tied", TIED)):
    cfg, state, run = imported[name, False]
    out = str(tmp_path / name)
    hf.export(state.params, cfg.model, out, run_dir=run)
    original, exported = _tensors(hf_dir), _tensors(out)
    assert sorted(exported) == sorted(original)  # tied: no lm_head on either side
    for key, value in original.items():
      np.testing.assert_array_equal(exported[key], value, err_msg=key)
    config = hf.read_config(out)
    assert config["tie_word_embeddings"] is (name == "tied") and hf.FTJAX_KEY not in config
    assert hf.model_fields(config) == hf.model_fields(hf.read_config(hf_dir))
    assert os.path.exists(os.path.join(out, "tokenizer.json"))


def test_export_from_a_sharded_restore_gives_the_checkpoint_tensors(imported, tmp_path):
  """launch.export_hf --mesh: the run restored sharded (parameters only), gathered to write."""
  _, _, run = imported["untied", False]
  trainer, state = load_run(run, mesh={"fsdp": 2, "tensor": 2})
  assert trainer.mesh.devices.size == 4
  hf.export(state.params, trainer.cfg.model, str(tmp_path), run_dir=run)
  original, exported = _tensors(UNTIED), _tensors(str(tmp_path))
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_export_free_transformer_imports_back(imported, tmp_path):
  cfg, state, run = imported["tied", True]
  # A trained-looking latent path: a non-zero post-sampler, so that Z changes the logits.
  params = dict(state.params)
  params["latent"] = dict(params["latent"])
  params["latent"]["post_sampler"] = jax.random.normal(
      jax.random.key(1), params["latent"]["post_sampler"].shape)
  out = str(tmp_path / "ft")
  hf.export(params, cfg.model, out, run_dir=run)
  config = hf.read_config(out)
  assert config[hf.FTJAX_KEY]["latent"]["enabled"] is True
  assert any(n.startswith(hf.LATENT_PREFIX) for n in hf.Checkpoint(out).names())
  # Imported back with the baseline's config file: the export's latent settings win.
  cfg2 = config_for(out)
  assert cfg2.model.latent.to_dict() == cfg.model.latent.to_dict()
  state2 = hf.import_run(out, str(tmp_path / "run2"), cfg2, log=lambda *_: None)
  same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), state2.params, params)
  assert all(jax.tree_util.tree_leaves(same))
  tokens = np.load(os.path.join(TIED, "expected.npz"))["tokens"]
  np.testing.assert_array_equal(logits(cfg2, state2.params, tokens, "uniform"),
                                logits(cfg, params, tokens, "uniform"))
  # ... and as a baseline when the user turns the latent off: the decoder alone.
  cfg3 = config_for(out, **{"model.latent.enabled": False})
  assert not cfg3.model.latent.enabled


def _hf_config(**changes):
  config = hf.read_config(UNTIED)
  config.update(changes)
  return config


@pytest.mark.parametrize("changes,message", [
    ({"attention_bias": True}, "attention_bias=true"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_type='yarn'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_type='dynamic'"),
    ({"head_dim": 7}, "head_dim=7 is odd"),
    ({"quantization_config": {"bits": 4}}, "quantized"),
])
def test_unsupported_configs_are_errors(changes, message):
  with pytest.raises(hf.HFError, match=message.replace("(", r"\(").replace("[", r"\[")):
    hf.model_fields(_hf_config(**changes))


def test_legacy_rope_keys():
  """transformers 4 style: rope_theta and rope_scaling at the top level."""
  config = _hf_config(rope_parameters=None, rope_theta=5e5, rope_scaling={
      "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192})
  fields = hf.model_fields(config)
  assert fields["rope_theta"] == 5e5 and fields["rope_scaling"]["factor"] == 32.0


def test_architecture_override_contradicting_checkpoint_is_an_error():
  from experiments import tiny
  with pytest.raises(hf.HFError, match="model.d_model=64 contradicts"):
    hf.build_config(tiny.get_config(), hf.read_config(UNTIED), {"model.d_model": 64})


def test_bias_tensor_in_checkpoint_is_an_error(tmp_path):
  ckpt = hf.Checkpoint(UNTIED)
  tensors = [(n, ckpt.shape(n), np.float32, lambda n=n: ckpt.get(n)) for n in sorted(ckpt.names())]
  tensors.append(("model.layers.0.self_attn.q_proj.bias", (32,), np.float32,
                  lambda: np.zeros(32, np.float32)))
  hf.write_safetensors(str(tmp_path / hf.SINGLE_FILE), tensors)
  with open(tmp_path / hf.CONFIG_FILE, "w", encoding="utf-8") as f:
    json.dump(hf.read_config(UNTIED), f)
  cfg = config_for(UNTIED)
  with pytest.raises(hf.HFError, match="q_proj.bias in the checkpoint has no place"):
    hf.check_tensors(hf.Checkpoint(str(tmp_path)), cfg.model, tied=False)


def test_bfloat16_tensors_are_read(tmp_path):
  import ml_dtypes
  x = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
  hf.write_safetensors(str(tmp_path / "a.safetensors"), [("x", (2, 3), ml_dtypes.bfloat16,
                                                          lambda: x)])
  got = hf.SafetensorsFile(str(tmp_path / "a.safetensors")).get("x")
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.arange(6).reshape(2, 3))


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600)


@pytest.mark.slow  # 80 s: the launchers end to end; the import/export tests above cover the maths
def test_cli_import_train_export(tmp_path):
  """import_hf → launch.train continues the run from step 0 → launch.sample reads it with the
  checkpoint's tokenizer → export_hf of step 0 gives the checkpoint's tensors back; bad input
  is one line and exit 2."""
  run, out = str(tmp_path / "run"), str(tmp_path / "out")
  r = _run("launch.import_hf", f"--hf_dir={UNTIED}", f"--workdir={run}",
           "--config=experiments/tiny.py", "--config.model.latent.enabled=True")
  assert r.returncode == 0, r.stderr[-2000:]
  r = _run("launch.train", f"--config={run}/config.py", f"--workdir={run}",
           "--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_every=2",
           "--config.train.num_samples=0", "--config.train.warmup_steps=1")
  assert r.returncode == 0, r.stderr[-2000:]
  steps = [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))]
  assert steps[0] == 1 and steps[-1] == 2  # continued from the imported step 0
  r = _run("launch.sample", f"--workdir={run}", "--prompt=the cat sat on", "--temperature=0",
           "--max_new_tokens=3", f"--output={tmp_path}/s.jsonl")
  assert r.returncode == 0, r.stderr[-2000:]
  record = json.loads(open(f"{tmp_path}/s.jsonl").readline())
  assert record["prompt"] == "the cat sat on"  # the checkpoint's own (word-level) tokenizer
  r = _run("launch.export_hf", f"--workdir={run}", f"--out={out}", "--step=0")
  assert r.returncode == 0, r.stderr[-2000:]
  original, exported = _tensors(UNTIED), _tensors(out)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  r = _run("launch.import_hf", f"--hf_dir={UNTIED}", f"--workdir={run}",
           "--config=experiments/tiny.py")
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
  assert "already holds checkpoints" in r.stderr
  r = _run("launch.import_hf", f"--hf_dir={tmp_path}", f"--workdir={tmp_path / 'x'}",
           "--config=experiments/tiny.py")
  assert r.returncode == 2 and "config.json not found" in r.stderr
  assert r.stderr.strip().count("\n") == 0


def test_tied_checkpoint_stays_tied_unless_untied(imported, tmp_path):
  cfg, state, _ = imported["tied", False]
  assert cfg.model.tie_embeddings and "unembed" not in state.params
  assert not imported["untied", False][0].model.tie_embeddings
  untie = config_for(TIED, **{"model.tie_embeddings": False})
  state2 = hf.import_run(TIED, str(tmp_path / "untied"), untie, log=lambda *_: None)
  np.testing.assert_array_equal(state2.params["unembed"]["kernel"], state2.params["embed"].T)
  expected = np.load(os.path.join(TIED, "expected.npz"))
  np.testing.assert_allclose(logits(untie, state2.params, expected["tokens"], "zero"),
                             expected["logits"], atol=1e-4, rtol=1e-4)
  with pytest.raises(hf.HFError, match="has its own lm_head"):
    config_for(UNTIED, **{"model.tie_embeddings": True})


@pytest.mark.slow  # two launch.sample processes
def test_sample_chat_writes_prompts_in_the_chat_template(imported, tmp_path):
  from .test_chat_template import LLAMA3
  hf_dir = tmp_path / "hf"
  shutil.copytree(UNTIED, hf_dir)
  (hf_dir / "chat_template.jinja").write_text(LLAMA3)
  run = str(tmp_path / "run")
  hf.import_run(str(hf_dir), run, config_for(str(hf_dir)), log=lambda *_: None)
  r = _run("launch.sample", f"--workdir={run}", "--chat", "--system=be brief",
           "--prompt=the cat sat on", "--temperature=0", "--max_new_tokens=3",
           f"--output={tmp_path}/s.jsonl")
  assert r.returncode == 0, r.stderr[-2000:]
  tok = hf.RunTokenizer(run)
  text = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": "the cat sat on"}])
  assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
  record = json.loads(open(f"{tmp_path}/s.jsonl").readline())
  assert record["prompt"] == tok.decode(tok.encode(text))
  r = _run("launch.sample", f"--workdir={imported['untied', False][2]}", "--chat",
           "--prompt=the cat")
  assert r.returncode == 2 and "no chat template" in r.stderr
  assert r.stderr.strip().count("\n") == 0
