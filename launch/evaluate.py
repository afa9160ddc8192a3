"""Evaluate a trained run on held-out data.

  python -m launch.evaluate --workdir=runs/shakespeare [--split=validation] [--num_batches=16]
      [--choices_file=questions.jsonl] [--generate=64]

Prints (and with --output writes as JSON): `eval_ce` (for a Free Transformer: Z uniform, what
generation sees), `eval_elbo` (CE with Z from the encoder + KL, a bound on the NLL), `eval_kl`,
and bits per byte for text. A large gap between the two says κ lets Z carry too much. For a Free
Transformer also the Z diagnostics (ftjax/zdiag.py): `eval_z_use` (uniform-Z CE minus
encoder-Z CE, a diagnostic: ≈ 0 when the decoder ignores Z), `eval_z_kl_bitHH` and
`eval_z_active_bits` (bits above 0.01 nats), `eval_z_mi` (Monte-Carlo I(X; Z) over 1024 tokens
of each batch, ≤ ln 1024) and `eval_z_mi_bits_bound` (Σ_h I(X; B_h) ≥ I(X; Z)),
`eval_z_code_ppl[_argmax]` (codes in use), averaged over the batches.
--choices_file scores multiple-choice questions (JSON lines {"question", "choices", "answer"})
by summed log-likelihood; --generate samples N sequences (Z uniform) of the synthetic task and reports
the fraction that is well-formed.
"""

import json

from absl import flags

from launch import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", lower_bound=0)
_SPLIT = flags.DEFINE_enum("split", "validation", ["train", "validation"], "Data split.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 0, "Batches (0: the run's train.eval_batches).",
                                    lower_bound=0)
_CHOICES = flags.DEFINE_string("choices_file", None, "Multiple-choice questions (JSON lines).")
_GENERATE = flags.DEFINE_integer("generate", 0, "Synthetic task: sequences to generate for the "
                                 "well-formed fraction.", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for Z and sampling.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results to this JSON file.")
_MESH = cli.define_restore_mesh()


def describe(key, value):
  """A value with its unit (`ftjax.metrics.display_unit`: KL and mutual information in bits,
  CE in nats per token)."""
  from ftjax.metrics import display_unit
  if not isinstance(value, float):
    return f"{value}"
  divisor, unit = display_unit(key)
  return f"{value / divisor:.4f} {unit}".rstrip()


def main(argv):
  cli.check_paths(inputs=[("choices_file", _CHOICES.value)], outputs=[("output", _OUTPUT.value)])
  trainer, state = cli.restored_trainer(argv, _WORKDIR.value, _STEP.value, _MESH.value)
  import jax
  import numpy as np

  from ftjax import evaluation, loop
  from ftjax.data import synthetic
  cfg, params = trainer.cfg, state.params
  results = {"step": int(state.step), "devices": int(trainer.mesh.devices.size)}
  key = jax.random.key(_SEED.value)
  results.update(trainer.evaluate(params, _SPLIT.value, _NUM_BATCHES.value, key))
  if _CHOICES.value:
    try:
      items = evaluation.read_choices(_CHOICES.value)
    except (OSError, ValueError) as e:
      cli.fail(f"flag error: --choices_file: {e}")
    results["choice_accuracy"], _ = evaluation.multiple_choice(
        trainer.model, params, trainer.source.encode, items, key)
  if _GENERATE.value and trainer.source.name == "synthetic":
    texts = loop.sample_texts(trainer, params, _GENERATE.value, key)
    results["well_formed"] = float(np.mean(synthetic.well_formed(texts, cfg.data.block_len)))
  for k, v in results.items():
    print(f"{k:24s} {describe(k, v)}")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  cli.run(main)
