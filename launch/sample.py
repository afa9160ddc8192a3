"""Sample from a trained run with a KV cache and any way of choosing Z.

  python -m launch.sample --workdir=runs/synthetic --prompt="A>" --num_samples=4 \
      [--z_seed=1,2,3] [--step=N] [--output=samples.jsonl]

--z_seed=K holds one draw of Z from the prior (a code drawn uniformly per position, the way
generation draws it) fixed across the samples, while the sampling noise (--seed) still varies
from sample to sample: what the samples of one draw have in common, and samples of other draws
do not, is what Z encodes. Several seeds give one group of --num_samples samples per draw and
prompt. (--z_mode=fixed --code=N puts one constant code at every position instead, which
training never sees.)

Restores the parameters onto the devices at hand (one by default, whatever mesh trained the run),
and the config and tokenizer saved with the run (for a run made by launch.import_hf: the
checkpoint's own tokenizer, RUN/hf_tokenizer/tokenizer.json). Prints the samples and writes
JSON lines {prompt, sample, z_mode, codes, seed}.

An imported instruct checkpoint answers in its chat template:

  python -m launch.sample --workdir=runs/llama_instruct --chat --prompt="Name three rivers." \
      [--system="Be brief."] --max_new_tokens=64 --temperature=0

(each prompt becomes a user message written in the template, followed by the assistant's
header; generation stops at the tokenizer's end-of-sequence token).
"""

import json
import sys

from absl import flags

from launch import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", lower_bound=0)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable). Synthetic runs: e.g. "
                                    "'A>'. Default: the run's own sample prompts.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.", lower_bound=1)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 0, "Tokens to generate (0: fill the model's "
                                "training length).", lower_bound=0)
_Z_MODE = flags.DEFINE_enum("z_mode", "uniform", ["uniform", "fixed", "encoder"],
                            "How Z is chosen (Free Transformer).")
_NEW_Z = flags.DEFINE_enum("new_z", "uniform", ["uniform", "fixed"],
                           "With --z_mode=encoder: Z of the generated tokens.")
_CODE = flags.DEFINE_integer("code", None, "With fixed Z: the code (default: random per sample).")
_Z_SEEDS = flags.DEFINE_list("z_seed", [], "Hold one draw of Z from the prior (a uniform code per "
                             "position) fixed across the samples, the sampling noise still "
                             "varying; several seeds: one group of samples per draw.")
_ENCODER_ARGMAX = flags.DEFINE_bool("encoder_argmax", False, "With --z_mode=encoder: the most "
                                    "likely code instead of a sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "0: greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).", lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling threshold.", lower_bound=1e-6,
                           upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON-lines file to write.")
_MESH = cli.define_restore_mesh()
_CHAT = flags.DEFINE_bool("chat", False, "Write each prompt as a user message in the run's chat "
                          "template (an imported instruct checkpoint) and stop at its EOS token.")
_SYSTEM = flags.DEFINE_string("system", None, "With --chat: a system message before each prompt.")


def _chat_prompts(hf_tokenizer, prompts):
  """The prompts as user turns in the checkpoint's chat template, ready for the answer."""
  from ftjax.errors import ChatTemplateError
  if hf_tokenizer is None:
    cli.fail(f"flag error: --chat: {_WORKDIR.value} has no Hugging Face tokenizer, so no chat "
             "template")
  if not prompts:
    cli.fail("flag error: --chat needs --prompt or --prompts_file")
  system = [{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else []
  try:
    return [hf_tokenizer.apply_chat_template(system + [{"role": "user", "content": p}])
            for p in prompts]
  except ChatTemplateError as e:
    cli.fail(f"flag error: --chat: {e}")


def _check_z_flags():
  """Exits 2 with one line when a Z flag would be ignored by the chosen --z_mode."""
  encoder = _Z_MODE.value == "encoder"
  if _CODE.value is not None and not (_Z_MODE.value == "fixed" or
                                      (encoder and _NEW_Z.value == "fixed")):
    cli.fail("flag error: --code needs --z_mode=fixed (or --z_mode=encoder --new_z=fixed)")
  if not encoder and (_NEW_Z.value != "uniform" or _ENCODER_ARGMAX.value):
    cli.fail("flag error: --new_z and --encoder_argmax need --z_mode=encoder")
  if _Z_SEEDS.value and (_Z_MODE.value != "uniform" or _CODE.value is not None):
    cli.fail("flag error: --z_seed draws Z from the prior itself: leave out --z_mode and --code")
  if not all(s.lstrip("-").isdigit() for s in _Z_SEEDS.value):
    cli.fail(f"flag error: --z_seed takes integers, got {','.join(_Z_SEEDS.value)}")


def _prior_draws(seeds, lat, start_B, length):
  """(B, length) codes: row i holds the draw of seeds[i] (one uniform code per position, from
  jax.random.key(seed)), aligned to the row's first real token, so that left-padded prompts of
  different lengths see the same code at the same token position."""
  import jax
  import numpy as np

  from ftjax import latent as latent_lib
  draws = {s: np.asarray(latent_lib.uniform_codes(jax.random.key(s), (length,), lat.num_bits))
           for s in set(seeds)}
  codes_BT = np.zeros((len(seeds), length), np.int32)
  for i, (s, start) in enumerate(zip(seeds, start_B)):
    codes_BT[i, start:] = draws[s][:length - start]
  return codes_BT


def _data_prompts(cfg, n):
  """`n` prompts from the run's data (its source's own kind of prompt): only without --prompt
  is the training data opened."""
  from ftjax.data import make_source
  from ftjax.errors import CorpusError
  try:
    return make_source(cfg, _WORKDIR.value).prompts(n)
  except CorpusError as e:
    raise CorpusError(f"no --prompt given, and the run's data gives none: {e}") from None


def main(argv):
  cli.check_paths(inputs=[("prompts_file", _PROMPTS_FILE.value)], outputs=[("output", _OUTPUT.value)])
  _check_z_flags()
  restored = cli.restored_run(argv, _WORKDIR.value, _STEP.value, _MESH.value)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ftjax import sampling
  from ftjax.model import make_model
  from ftjax import hf
  cfg, text = restored.cfg, restored.text
  if not cfg.model.latent.enabled and (_Z_MODE.value != "uniform" or _CODE.value is not None
                                       or _Z_SEEDS.value):
    flag = "--z_seed" if _Z_SEEDS.value else f"--z_mode={_Z_MODE.value}"
    cli.fail(f"flag error: {flag}: {_WORKDIR.value} is a baseline run (no Z)")
  hf_tokenizer = hf.run_tokenizer(_WORKDIR.value)  # an imported checkpoint's own tokenizer
  encode = (lambda string, start: hf_tokenizer.encode(string)) if hf_tokenizer else text.encode
  decode = hf_tokenizer.decode if hf_tokenizer else text.decode
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if _SYSTEM.value and not _CHAT.value:
    cli.fail("flag error: --system needs --chat")
  eos_id = None
  if _CHAT.value:
    prompts, eos_id = _chat_prompts(hf_tokenizer, prompts), hf_tokenizer.eos_id
  try:
    tokens = ([encode(p, True) for p in prompts] if prompts else
              list(_data_prompts(cfg, max(_NUM_SAMPLES.value, 1))))
  except ValueError as e:
    cli.fail(f"flag error: a prompt has characters outside the run's vocabulary ({e})")
  z_seeds = [int(s) for s in _Z_SEEDS.value] or [None]
  repeat = _NUM_SAMPLES.value if prompts else 1  # data prompts: already one per sample
  tokens, seeds = ([t for t in tokens for _ in z_seeds for _ in range(repeat)],
                   [s for _ in tokens for s in z_seeds for _ in range(repeat)])
  prompt_BP, start_B = sampling.left_pad(tokens)
  max_new = _MAX_NEW.value or max(cfg.model.seq_len + 1 - prompt_BP.shape[1], 1)
  if not _MAX_NEW.value and prompt_BP.shape[1] >= cfg.model.seq_len:
    print(f"note: a prompt of {prompt_BP.shape[1]} tokens fills the training length "
          f"({cfg.model.seq_len}); generating 1 token (set --max_new_tokens)", file=sys.stderr)
  codes_B = None
  if _CODE.value is not None:
    if not 0 <= _CODE.value < 2**cfg.model.latent.num_bits:
      cli.fail(f"flag error: --code must be in 0..{2**cfg.model.latent.num_bits - 1}")
    codes_B = jnp.full((len(tokens),), _CODE.value, jnp.int32)
  z_mode, fixed_codes_BT = _Z_MODE.value, None
  if _Z_SEEDS.value:
    z_mode = "fixed"
    fixed_codes_BT = jnp.asarray(_prior_draws(seeds, cfg.model.latent, start_B,
                                              prompt_BP.shape[1] + max_new))
  out = sampling.generate(
      make_model(cfg.model, decode=True), restored.params, jnp.asarray(prompt_BP),
      jnp.asarray(start_B), jax.random.key(_SEED.value), max_new_tokens=max_new,
      z_mode=z_mode, new_z=_NEW_Z.value, codes_B=codes_B, fixed_codes_BT=fixed_codes_BT,
      encoder_argmax=_ENCODER_ARGMAX.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
      top_p=_TOP_P.value, eos_id=eos_id)
  rows = []
  for i, row in enumerate(np.asarray(out["tokens"])):
    p = prompt_BP.shape[1]
    record = {"prompt": decode(row[start_B[i]:p]), "sample": decode(row[p:]),
              "z_mode": _Z_MODE.value, "seed": _SEED.value}
    if seeds[i] is not None:
      record.update(z_mode="prior_draw", z_seed=seeds[i])
      if i == 0 or seeds[i] != seeds[i - 1]:
        print(f"Z draw {seeds[i]}:")
    if "codes" in out:
      record["codes"] = np.asarray(out["codes"][i, start_B[i]:]).tolist()
    rows.append(record)
    print(("  " if seeds[i] is not None else "") + f"{record['prompt']!r} -> {record['sample']!r}")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  cli.run(main)
