"""Retrofit a pretrained decoder into a Free Transformer, measured next to the decoder
continued alone (one seed, CPU-sized).

  python -m experiments.retrofit --workdir=runs/retrofit [--pretrain_steps=400] [--steps=200]
      [--out=experiments/results/retrofit]

1. Pretrain a small byte-level baseline on Shakespeare (in-memory crops) for --pretrain_steps.
2. Export it as a Hugging Face Llama directory (launch.export_hf's code path).
3. Import it twice (launch.import_hf's code path): as a baseline, and as a Free Transformer
   (H=8, κ = 0.5 bit, fresh latent path with a zero post-sampler, so at step 0 it computes the
   pretrained decoder exactly).
4. Continue both for --steps on the same batches (the same seed: crops keyed by (seed, step),
   a seed other than pretraining's, so the crops are new) with a fresh optimizer.
5. Evaluate step 0 and the last step of both on the same held-out batches: eval CE (the FT
   with Z uniform per token, what generation sees), ELBO (encoder Z, CE + KL) and KL.

Writes OUT/retrofit.json and OUT/retrofit.csv.
"""

import csv
import json
import os
import time

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "runs/retrofit", "Root of the three runs.")
_PRETRAIN = flags.DEFINE_integer("pretrain_steps", 400, "Baseline pretraining steps.")
_STEPS = flags.DEFINE_integer("steps", 200, "Continued-training steps of each arm.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 16, "Held-out batches per evaluation.")
_OUT = flags.DEFINE_string("out", "experiments/results/retrofit", "Where the numbers go.")


def pretrain_config(steps):
  """The text sweep's model shape (experiments/text_sweep.py) as a baseline, in-memory crops."""
  from experiments import text_sweep
  c = text_sweep.get_config()
  c.data.loader = "memory"
  c.model.latent.enabled = False
  c.model.latent.num_bits = 8
  c.model.latent.kappa_bits = 0.5
  c.train.steps = steps
  c.train.batch_size = 8
  c.train.lr = 3e-3
  c.train.warmup_steps = 50
  c.train.log_every = 100
  c.train.eval_every = steps
  c.train.eval_batches = 4
  c.train.num_samples = 0
  c.mesh.data = 1
  return c


def continue_config(steps, latent):
  c = pretrain_config(steps)
  c.seed = 1  # new crops, the same for both arms
  c.model.latent.enabled = latent
  c.train.lr = 1e-3
  c.train.warmup_steps = 20
  return c


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from ftjax import hf, loop
  from ftjax.trainer import load_run
  from ftjax.configs import resolve
  root = _WORKDIR.value
  timings = {}
  pre_dir = os.path.join(root, "pretrain")
  t0 = time.time()
  loop.train_and_evaluate(resolve(pretrain_config(_PRETRAIN.value)), pre_dir)
  timings["pretrain_s"] = time.time() - t0
  trainer, state = load_run(pre_dir)
  hf_dir = os.path.join(root, "hf_export")
  hf.export(state.params, trainer.cfg.model, hf_dir, run_dir=pre_dir)
  rows = []
  for arm, latent in (("baseline", False), ("free_transformer", True)):
    run = os.path.join(root, arm)
    overrides = {"model.latent.enabled": latent}
    cfg = resolve(hf.build_config(continue_config(_STEPS.value, latent), hf.read_config(hf_dir),
                                  overrides))
    if not os.path.isdir(os.path.join(run, "checkpoints")):
      hf.import_run(hf_dir, run, cfg)
    t0 = time.time()
    loop.train_and_evaluate(cfg, run)
    timings[f"{arm}_s"] = time.time() - t0
    for step in (0, _STEPS.value):
      trainer, state = load_run(run, step)
      ev = trainer.evaluate(state.params, num_batches=_EVAL_BATCHES.value)
      rows.append({"arm": arm, "step": step, "eval_ce": ev["eval_ce"],
                   "eval_elbo": ev["eval_elbo"], "eval_kl": ev.get("eval_kl", 0.0),
                   "eval_bpb": ev.get("eval_bpb")})
      print(rows[-1])
  os.makedirs(_OUT.value, exist_ok=True)
  result = {
      "what": "byte-level Shakespeare baseline pretrained, exported to HF Llama format, imported "
              "as a baseline and as a Free Transformer (H=8, kappa=0.5 bit), both continued on "
              "the same batches; eval on the same held-out batches (nats per token; eval_ce of "
              "the FT with Z uniform per token; eval_elbo = CE with encoder Z + KL)",
      "seeds": 1, "pretrain_steps": _PRETRAIN.value, "continued_steps": _STEPS.value,
      "eval_batches": _EVAL_BATCHES.value, "tokens_per_batch": 8 * 128,
      "command": f"python -m experiments.retrofit --workdir={root} "
                 f"--pretrain_steps={_PRETRAIN.value} --steps={_STEPS.value} "
                 f"--eval_batches={_EVAL_BATCHES.value}",
      "wall_seconds": {k: round(v, 1) for k, v in timings.items()},
      "rows": rows}
  with open(os.path.join(_OUT.value, "retrofit.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(_OUT.value, "retrofit.csv"), "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


if __name__ == "__main__":
  app.run(main)
