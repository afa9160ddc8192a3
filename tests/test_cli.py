"""launch.sample and launch.evaluate on a run trained on the fake 8-device mesh; the scorer."""

import importlib
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import evaluation
from ftjax.data import synthetic
from ftjax.model import make_model
from ftjax.train import init_params
from tests.conftest import REPO
from ftjax.trainer import load_run


def _run(module, *flags):
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


@pytest.fixture(scope="module")
def run_on_8_devices(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run8")
  result = _run("launch.train", "--config=experiments/tiny.py", f"--workdir={workdir}",
                "--config.mesh.data=4", "--config.mesh.tensor=2", "--config.train.batch_size=8",
                "--config.train.num_samples=0", "--config.train.peak_flops=1e9")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_sample_cli_restores_onto_one_device(run_on_8_devices, tmp_path):
  out = tmp_path / "samples.jsonl"
  result = _run("launch.sample", f"--workdir={run_on_8_devices}", "--prompt=A>", "--prompt=QQ",
                "--num_samples=2", "--z_mode=fixed", "--code=5", "--seed=3", f"--output={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in open(out)]
  assert [r["prompt"] for r in rows] == ["A>", "A>", "QQ", "QQ"]
  assert all(r["z_mode"] == "fixed" and r["seed"] == 3 and set(r["codes"]) == {5} for r in rows)
  assert all(0 < len(r["sample"]) <= 64 for r in rows)  # up to the training length (67 tokens)
  again = _run("launch.sample", f"--workdir={run_on_8_devices}", "--prompt=A>", "--num_samples=2",
               "--z_mode=fixed", "--code=5", "--seed=3")
  assert again.stdout.splitlines()[:2] == result.stdout.splitlines()[:2]  # deterministic


def test_sample_cli_holds_a_prior_draw_of_z_across_samples(run_on_8_devices, tmp_path):
  """--z_seed: one draw of Z from the prior per seed, shared by that group's samples (codes
  aligned to each prompt's first token), the sampling noise still varying."""
  out = tmp_path / "samples.jsonl"
  result = _run("launch.sample", f"--workdir={run_on_8_devices}", "--prompt=A>", "--prompt=QQQ",
                "--num_samples=3", "--z_seed=1,2", "--seed=3", f"--output={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in open(out)]
  assert [(r["prompt"], r["z_seed"]) for r in rows] == [
      (p, s) for p in ("A>", "QQQ") for s in (1, 2) for _ in range(3)]
  assert all(r["z_mode"] == "prior_draw" for r in rows)
  draws = {}
  for r in rows:  # the same codes at the same token positions for every sample of a seed
    n = min(len(r["codes"]), len(draws.get(r["z_seed"], r["codes"])))
    assert draws.setdefault(r["z_seed"], r["codes"])[:n] == r["codes"][:n]
  assert draws[1] != draws[2] and len(set(draws[1])) > 1  # a code per position, not a constant
  assert len({r["sample"] for r in rows}) > 2  # the sampling noise still varies
  assert result.stdout.count("Z draw 1:") == 2 and result.stdout.count("Z draw 2:") == 2
  bad = _run("launch.sample", f"--workdir={run_on_8_devices}", "--z_seed=1", "--code=3",
             "--z_mode=fixed")
  assert bad.returncode == 2 and "--z_seed draws Z from the prior" in bad.stderr, bad.stderr


def test_sample_and_evaluate_on_a_mesh_match_one_device(run_on_8_devices, tmp_path):
  flags = [f"--workdir={run_on_8_devices}", "--prompt=A>", "--prompt=QQ", "--num_samples=2",
           "--z_mode=fixed", "--code=5", "--seed=3"]
  one, sharded = (_run("launch.sample", *flags, *mesh) for mesh in ([], ["--mesh=fsdp=2,tensor=2"]))
  assert one.returncode == 0 and sharded.returncode == 0, sharded.stderr[-3000:]
  assert sharded.stdout == one.stdout
  reports = []
  for mesh in ([], ["--mesh=data=2,tensor=2"]):
    out = tmp_path / f"eval{len(mesh)}.json"
    result = _run("launch.evaluate", f"--workdir={run_on_8_devices}", f"--output={out}", *mesh)
    assert result.returncode == 0, result.stderr[-3000:]
    reports.append(json.load(open(out)))
  assert (reports[0]["devices"], reports[1]["devices"]) == (1, 4)
  assert reports[1]["eval_ce"] == pytest.approx(reports[0]["eval_ce"], abs=1e-5)
  assert reports[1]["eval_elbo"] == pytest.approx(reports[0]["eval_elbo"], abs=1e-5)
  bad = _run("launch.sample", f"--workdir={run_on_8_devices}", "--mesh=fsdp=3")
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-2000:]


def test_sample_cli_notes_a_prompt_that_fills_the_training_length(run_on_8_devices):
  result = _run("launch.sample", f"--workdir={run_on_8_devices}", "--prompt=" + "_" * 80)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "tokens fills the training length (66); generating 1 token" in result.stderr
  assert len(result.stdout.strip().splitlines()) == 1


def test_evaluate_cli_reports_uniform_ce_elbo_and_choices(run_on_8_devices, tmp_path):
  questions = tmp_path / "q.jsonl"
  questions.write_text('{"question": "A>", "choices": ["AAAA", "!!!!"], "answer": 0}\n')
  out = tmp_path / "eval.json"
  result = _run("launch.evaluate", f"--workdir={run_on_8_devices}", f"--choices_file={questions}",
                "--generate=4", f"--output={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.load(open(out))
  assert {"eval_ce", "eval_elbo", "eval_kl", "choice_accuracy", "well_formed"} <= set(report)
  assert report["step"] == 20


def test_cli_errors_are_one_line(tmp_path):
  result = _run("launch.sample", f"--workdir={tmp_path}")
  assert result.returncode == 2 and "config.json not found" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def test_multiple_choice_picks_the_highest_likelihood(tiny_cfg, tmp_path):
  model = make_model(tiny_cfg.model)
  params = init_params(model, 0)
  key = jax.random.key(0)
  questions = ["A>", "B>__", "C>_!"]
  choices = [["AAA", "___", "!A"], ["BB", "!!!!"], ["_", "C", "!!", "CC_"]]

  def naive_scores(pairs):  # right-padded, no start offsets: earlier positions are unaffected
    seqs = [synthetic.encode(q + c) for q, c in pairs]
    t = max(len(s) for s in seqs)
    tokens = np.stack([np.pad(s, (0, t - len(s))) for s in seqs])
    codes = jax.random.randint(jax.random.key(1), tokens.shape, 0, 16)
    apply = jax.jit(lambda x, z: model.apply({"params": params}, x, z_mode="given", codes_BT=z)[0])
    logp = jax.nn.log_softmax(apply(jnp.asarray(tokens), codes)[:, :-1])
    token_logp = np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1)[..., 0])
    return [float(token_logp[i, len(s) - 1 - len(c):len(s) - 1].sum())
            for i, (s, (_, c)) in enumerate(zip(seqs, pairs))]

  # The post-sampler is zero at init, so the codes drawn here and in the scorer do not matter.
  pairs = [(q, c) for q, cs in zip(questions, choices) for c in cs]
  flat = iter(naive_scores(pairs))
  best = [int(np.argmax([next(flat) for _ in cs])) for cs in choices]
  answers = [best[0], (best[1] + 1) % 2, best[2]]  # two right, one wrong
  path = tmp_path / "q.jsonl"
  with open(path, "w") as f:
    for q, cs, a in zip(questions, choices, answers):
      f.write(json.dumps({"question": q, "choices": cs, "answer": a}) + "\n")
  encode = lambda s, start: synthetic.encode(s, bos=start)
  accuracy, predictions = evaluation.multiple_choice(model, params, encode,
                                                     evaluation.read_choices(path), key)
  assert predictions == best and abs(accuracy - 2 / 3) < 1e-9


def test_evaluation_docstring_names_what_exists():
  names = re.findall(r"`([\w.]+)`", evaluation.__doc__)
  assert {"sequence_logliks", "multiple_choice", "ftjax.data.synthetic.well_formed"} <= set(names)
  for name in names:
    module, _, attr = name.rpartition(".")
    assert hasattr(importlib.import_module(module) if module else evaluation, attr), name


def test_read_choices_rejects_bad_lines(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"question": "A>", "choices": ["x"], "answer": 0}\n')
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    evaluation.read_choices(path)


BAD_FLAGS = [
    ("launch.sample", ["--num_samples=0"], "num_samples"),
    ("launch.sample", ["--top_p=1.5"], "top_p"),
    ("launch.sample", ["--temperature=-1"], "temperature"),
    ("launch.sample", ["--step=-3"], "step"),
    ("launch.sample", ["--prompts_file={tmp}/missing.txt"], "no such file"),
    ("launch.sample", ["--output={tmp}/no/dir/samples.jsonl"], "does not exist"),
    ("launch.sample", ["--code=5"], "--code needs --z_mode=fixed"),
    ("launch.sample", ["--z_mode=fixed", "--new_z=fixed"], "need --z_mode=encoder"),
    ("launch.sample", ["--encoder_argmax"], "need --z_mode=encoder"),
    ("launch.evaluate", ["--num_batches=-1"], "num_batches"),
    ("launch.evaluate", ["--choices_file={tmp}/missing.jsonl"], "no such file"),
    ("launch.evaluate", ["--output={tmp}"], "is a directory"),
    ("launch.dryrun", ["--config=experiments/tiny.py", "--num_devices=0"], "num_devices"),
    ("launch.dryrun", ["--config=experiments/tiny.py", "--hbm_gb=0"], "hbm_gb"),
    ("launch.train", ["--config=experiments/tiny.py", "--workdir={tmp}/file"], "not a directory"),
    ("launch.train", ["--config=experiments/tiny.py", "--workdir={tmp}/run", "--num_processes=2",
                      "--process_id=2", "--coordinator_address=127.0.0.1:1"], "process_id"),
    # Run directories may be gs:// or s3:// (tests/test_buckets.py); other schemes, and URLs
    # where ftjax reads through the file system, are refused: os/open would make a local folder.
    ("launch.train", ["--config=experiments/tiny.py", "--workdir=hdfs://cluster/run"],
     "only local paths, gs:// and s3://"),
    ("launch.sample", ["--workdir=hdfs://cluster/run"], "only local paths, gs:// and s3://"),
    ("launch.sweep", ["--config=tests/sweep_tiny.py", "--workdir=hdfs://cluster/sweep"],
     "only local paths, gs:// and s3://"),
    ("launch.prepare_data", ["--input=hdfs://cluster/*.jsonl", "--output={tmp}/data"],
     "only local paths, gs:// and s3://"),
    ("launch.lm_eval", ["--workdir={tmp}/run", "--tasks=t", "--output_path=hdfs://cluster/eval"],
     "only local paths, gs:// and s3://"),
    ("launch.export_hf", ["--workdir={tmp}/run", "--out=hdfs://cluster/model"],
     "only local paths, gs:// and s3://"),
    ("launch.import_hf", ["--hf_dir=hdfs://cluster/model", "--workdir={tmp}/run"],
     "only local paths, gs:// and s3://"),
]


@pytest.mark.parametrize("module,flags,message", BAD_FLAGS,
                         ids=[f"{m}:{f[-1].split('=')[0]}" for m, f, _ in BAD_FLAGS])
def test_bad_launcher_flags_exit_2_with_one_line(module, flags, message, tmp_path):
  (tmp_path / "file").write_text("not a directory")
  flags = [f.format(tmp=tmp_path) for f in flags]
  if module in ("launch.sample", "launch.evaluate") and not flags[0].startswith("--workdir"):
    flags.append(f"--workdir={tmp_path}/no_run")
  result = _run(module, *flags)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]
  assert not os.path.exists(os.path.join(REPO, "gs:")) and not os.path.exists(tmp_path / "data")


def test_library_refuses_unsupported_url_run_directories(tiny_cfg, tmp_path, monkeypatch):
  from ftjax import checkpoint, loop
  monkeypatch.chdir(tmp_path)
  with pytest.raises(checkpoint.CheckpointError, match="hdfs://cluster/run: only local paths"):
    loop.train_and_evaluate(tiny_cfg, "hdfs://cluster/run")
  with pytest.raises(checkpoint.CheckpointError, match="only local paths, gs:// and s3://"):
    load_run("ftp://host/run")
  assert not os.listdir(tmp_path)
