"""The lm-evaluation-harness model (ftjax.harness) on imported fixture Llamas and the offline
tasks in tests/lm_eval_task: per-sample log-likelihoods against ftjax's own scorer
(`evaluation.sequence_logliks`), rolling windows, greedy generation against teacher forcing,
Z modes, and the launcher end to end. Needs `lm_eval` (requirements-hf.txt)."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402

from ftjax import evaluation, hf, run  # noqa: E402
from ftjax.harness import FtjaxLM  # noqa: E402

from .conftest import REPO  # noqa: E402
from .test_hf import TIED, UNTIED, config_for  # noqa: E402

TASKS = os.path.join(REPO, "tests", "lm_eval_task")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{"baseline": (untied Llama, latent off), "ft": (tied Llama as an FT, step 0)} run dirs,
  each with (cfg, params)."""
  out = {}
  for name, hf_dir, latent in (("baseline", UNTIED, False), ("ft", TIED, True)):
    cfg = config_for(hf_dir, **{"model.latent.enabled": latent})
    run = str(tmp_path_factory.mktemp(name))
    state = hf.import_run(hf_dir, run, cfg, log=lambda *_: None)
    out[name] = (run, cfg, state.params)
  return out


def make_lm(runs, name, params=None, **kwargs):
  run_dir, _, run_params = runs[name]
  return FtjaxLM(run_dir, restored=run.load_for_inference(run_dir),
                 params=run_params if params is None else params,
                 batch_size=4, **kwargs)


PAIRS = [("the cat sat on the", " mat"), ("one two three", " four five"),
         ("what is the sun ? the sun is", " big"), ("day and", " night"),
         ("a", " red bird and a green fish")]


def requests(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def reference(lm, pairs, key=jax.random.key(0)):
  contexts, continuations = [], []
  for context, continuation in pairs:
    c, x = lm._encode_pair(context, continuation)
    contexts.append(c)
    continuations.append(x)
  return evaluation.sequence_logliks(lm.model, lm.params, contexts, continuations, key,
                                     z_mode="uniform")


@pytest.mark.parametrize("name,z_mode", [("baseline", "uniform"), ("ft", "uniform"),
                                         ("ft", "fixed"), ("ft", "encoder")])
def test_loglikelihood_equals_ftjax_scorer(runs, name, z_mode):
  """5 requests in batches of 4 (one padded batch): the same numbers as the scorer (the FT at
  step 0 computes the Llama whatever Z, so every Z mode must agree)."""
  lm = make_lm(runs, name, z_mode=z_mode)
  got = lm.loglikelihood(requests("loglikelihood", PAIRS))
  np.testing.assert_allclose([g[0] for g in got], reference(lm, PAIRS), atol=1e-4, rtol=1e-5)
  assert all(isinstance(g[1], bool) for g in got)


def test_uniform_and_fixed_z_reach_the_decoder(runs):
  """With a non-zero post-sampler Z changes the scores: fixed code c gives what the model
  computes with c at every position; uniform Z does not depend on the batch size."""
  _, cfg, params = runs["ft"]
  params = dict(params, latent=dict(params["latent"]))
  params["latent"]["post_sampler"] = 3 * jax.random.normal(
      jax.random.key(5), params["latent"]["post_sampler"].shape)
  lm = make_lm(runs, "ft", params=params, z_mode="fixed", code=5)
  got = [g[0] for g in lm.loglikelihood(requests("loglikelihood", PAIRS))]
  for (context, continuation), value in zip(PAIRS, got):
    c, x = lm._encode_pair(context, continuation)
    tokens = jnp.asarray([c + x])
    logits, _ = lm.model.apply({"params": params}, tokens, z_mode="given",
                               codes_BT=jnp.full(tokens.shape, 5, jnp.int32))
    logp = jax.nn.log_softmax(logits[0, :-1])[jnp.arange(tokens.shape[1] - 1), tokens[0, 1:]]
    np.testing.assert_allclose(value, float(logp[-len(x):].sum()), atol=1e-4, rtol=1e-5)
  uniform = [make_lm(runs, "ft", params=params, z_mode="uniform").loglikelihood(
      requests("loglikelihood", PAIRS))]
  lm1 = make_lm(runs, "ft", params=params, z_mode="uniform")
  lm1.batch_size_per_gpu = 1
  uniform.append(lm1.loglikelihood(requests("loglikelihood", PAIRS)))
  np.testing.assert_allclose([u[0] for u in uniform[0]], [u[0] for u in uniform[1]], atol=1e-4)
  assert not np.allclose([u[0] for u in uniform[0]], got, atol=1e-3)


def test_loglikelihood_rolling_windows(runs):
  lm = make_lm(runs, "baseline")
  text = "the cat sat on the mat and the dog sat on the log"
  tokens = lm.tok_encode(text)
  whole = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))[0]
  expected = evaluation.sequence_logliks(lm.model, lm.params, [[lm.prefix_token_id]], [tokens],
                                         jax.random.key(0))[0]
  np.testing.assert_allclose(whole, expected, atol=1e-4, rtol=1e-5)
  lm.max_length = 5  # windows of 5 tokens, each conditioned on the tokens before it
  windowed = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))[0]
  from lm_eval import utils
  windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
      tokens, lm.prefix_token_id, 5, 1)]
  assert len(windows) == 3 and sum(len(x) for _, x in windows) == len(tokens)
  expected = evaluation.sequence_logliks(lm.model, lm.params, [c for c, _ in windows],
                                         [x for _, x in windows], jax.random.key(0))
  np.testing.assert_allclose(windowed, sum(expected), atol=1e-4, rtol=1e-5)
  assert abs(windowed - whole) > 1e-3  # the windows do cut the context


def test_a_sharded_restore_scores_and_generates_as_one_device(runs):
  """launch.lm_eval --mesh: the run restored on 4 devices gives the same numbers and text."""
  run_dir = runs["ft"][0]
  lms, meshes = [], []
  for mesh in (None, {"fsdp": 4}):  # (one kv head: no tensor split)
    restored = run.load_for_inference(run_dir, mesh=mesh)
    meshes.append(restored.mesh)
    lms.append(FtjaxLM(run_dir, restored=restored, batch_size=4, z_mode="fixed", code=7))
  assert meshes[1].devices.size == 4
  one, sharded = (lm.loglikelihood(requests("loglikelihood", PAIRS)) for lm in lms)
  np.testing.assert_allclose([g[0] for g in sharded], [g[0] for g in one], atol=1e-4, rtol=1e-5)
  prompts = [lms[0].tok_encode(c) for c in ("one two", "the cat")]
  assert lms[1].generate_tokens(prompts, 5) == lms[0].generate_tokens(prompts, 5)


def test_generate_until_is_greedy(runs):
  """Greedy KV-cache generation (Z uniform, the FT at step 0) equals teacher-forced argmax;
  the text is the decoded tokens cut at the first `until` string."""
  lm = make_lm(runs, "ft")
  contexts = ["question : what is the sky ? answer :", "one two", "the cat"]
  prompts = [lm.tok_encode(c) for c in contexts]
  new_tokens = lm.generate_tokens(prompts, 5)
  for prompt, new in zip(prompts, new_tokens):
    assert 1 <= len(new) <= 5
    tokens = jnp.asarray([prompt + new])
    logits, _ = lm.model.apply({"params": lm.params}, tokens, z_mode="zero")
    greedy = np.asarray(jnp.argmax(logits[0], -1))
    assert new == greedy[len(prompt) - 1:len(prompt) - 1 + len(new)].tolist()
  texts = lm.generate_until(requests("generate_until", [
      (c, {"until": ["never"], "max_gen_toks": 5, "do_sample": False}) for c in contexts]))
  assert texts == [lm.tok_decode(new) for new in new_tokens]
  words = texts[0].split()
  if len(words) > 1:
    stopped = lm.generate_until(requests("generate_until", [
        (contexts[0], {"until": [" " + words[1]], "max_gen_toks": 5})]))[0]
    assert stopped == texts[0][:texts[0].index(" " + words[1])]


def test_launcher_with_offline_tasks(runs, tmp_path):
  """python -m launch.lm_eval on the three offline tasks; the logged per-sample
  log-likelihoods of the multiple-choice task equal ftjax's scorer."""
  run = runs["baseline"][0]
  r = subprocess.run(
      [sys.executable, "-m", "launch.lm_eval", f"--workdir={run}",
       "--tasks=ftjax_tiny_mc,ftjax_tiny_ppl,ftjax_tiny_gen", f"--include_path={TASKS}",
       f"--output_path={tmp_path}", "--log_samples", "--batch_size=4"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "ftjax_tiny_mc" in r.stdout and "bits_per_byte" in r.stdout
  samples = glob.glob(str(tmp_path / "**" / "samples_ftjax_tiny_mc_*.jsonl"), recursive=True)
  assert len(samples) == 1
  rows = [json.loads(line) for line in open(samples[0], encoding="utf-8")]
  assert len(rows) == 6
  lm = make_lm(runs, "baseline")
  for row in rows:
    pairs = [(a["arg_0"], a["arg_1"]) for a in row["arguments"].values()]
    got = [float(resp[0]) for resp in row["filtered_resps"]]
    np.testing.assert_allclose(got, reference(lm, pairs), atol=1e-4, rtol=1e-5)
  results = glob.glob(str(tmp_path / "**" / "results_*.json"), recursive=True)
  assert json.load(open(results[0]))["results"]["ftjax_tiny_mc"]["acc,none"] >= 0
  bad = subprocess.run([sys.executable, "-m", "launch.lm_eval", f"--workdir={run}",
                        "--tasks=no_such_task", f"--include_path={TASKS}"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "unknown lm_eval task" in bad.stderr
  assert bad.stderr.strip().count("\n") == 0


def test_same_numbers_as_lm_eval_hf_model(runs):
  """The imported baseline under lm_eval's own `hf` model (transformers) and under "ftjax":
  the same per-sample log-likelihoods on the offline multiple-choice and perplexity tasks."""
  pytest.importorskip("transformers")
  import lm_eval
  from lm_eval.tasks import TaskManager
  tasks = ["ftjax_tiny_mc", "ftjax_tiny_ppl"]

  def samples(model, **kwargs):
    out = lm_eval.simple_evaluate(
        model=model, tasks=tasks, log_samples=True, batch_size=4,
        task_manager=TaskManager(include_path=TASKS, include_defaults=False), **kwargs)
    return {t: [[float(r[0]) if isinstance(r, (list, tuple)) else float(r)
                 for r in s["filtered_resps"]] for s in out["samples"][t]] for t in tasks}

  cwd = os.getcwd()
  os.chdir(REPO)  # the task files name their data relative to the repository
  try:
    ours = samples(make_lm(runs, "baseline"))
    theirs = samples("hf", model_args={"pretrained": UNTIED, "dtype": "float32",
                                       "device": "cpu"})
  finally:
    os.chdir(cwd)
  for task in tasks:
    np.testing.assert_allclose(np.concatenate(ours[task]), np.concatenate(theirs[task]),
                               atol=1e-3, rtol=1e-4, err_msg=task)


def test_launcher_with_a_chat_template(runs, tmp_path):
  """--apply_chat_template writes each prompt in the checkpoint's chat template (few-shot
  examples as turns) and scores it; a run without a template fails in one line."""
  import shutil
  from .test_chat_template import LLAMA3
  hf_dir = tmp_path / "hf"
  shutil.copytree(UNTIED, hf_dir)
  (hf_dir / "chat_template.jinja").write_text(LLAMA3)
  run = str(tmp_path / "run")
  hf.import_run(str(hf_dir), run, config_for(str(hf_dir)), log=lambda *_: None)
  r = subprocess.run(
      [sys.executable, "-m", "launch.lm_eval", f"--workdir={run}", "--tasks=ftjax_tiny_mc",
       f"--include_path={TASKS}", f"--output_path={tmp_path / 'out'}", "--log_samples",
       "--num_fewshot=1", "--apply_chat_template", "--system_instruction=Answer."],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "chat template default" in r.stdout
  samples = glob.glob(str(tmp_path / "out" / "**" / "samples_ftjax_tiny_mc_*.jsonl"),
                      recursive=True)
  row = json.loads(open(samples[0], encoding="utf-8").readline())
  prompt = row["arguments"]["gen_args_0"]["arg_0"]
  assert prompt.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nAnswer.<|eot_id|>")
  assert prompt.count("<|start_header_id|>user") == 2  # the few-shot example and the question
  assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
  bad = subprocess.run([sys.executable, "-m", "launch.lm_eval", f"--workdir={runs['ft'][0]}",
                        "--tasks=ftjax_tiny_mc", f"--include_path={TASKS}",
                        "--apply_chat_template"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
  assert bad.returncode == 2 and "has no chat template" in bad.stderr
  assert bad.stderr.strip().count("\n") == 0
