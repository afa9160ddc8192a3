"""Import a Hugging Face Llama-architecture checkpoint as an ftjax run at step 0.

  python -m launch.import_hf --hf_dir=DIR --workdir=RUN [--config=experiments/hf_llama.py]
      [--config.model.latent.enabled=True --config.model.latent.kappa_bits=0.5 ...]

DIR holds config.json and safetensors weights (model.safetensors, or shards listed in
model.safetensors.index.json). The architecture comes from config.json; everything else from
--config and its overrides. With the latent on, the latent path is freshly initialised: its
post-sampler starts at zero, so the Free Transformer computes exactly the imported decoder at
step 0. RUN gets config.json, config.py (for `launch.train --config=RUN/config.py`),
hf_config.json, hf_tokenizer/ (the checkpoint's tokenizer files) and checkpoints/0 with a fresh
optimizer state. Continue with

  python -m launch.train --config=RUN/config.py --workdir=RUN [--config.train.steps=N]

and read it with launch.sample / launch.evaluate / launch.lm_eval. Anything ftjax would compute
differently (biases, another RoPE type, another architecture) is a one-line error, exit 2.

A checkpoint too large for one host imports with several processes, each reading only the
tensor shards of its own devices (same flags as launch.train; SLURM and TPU VMs are detected):

  python -m launch.import_hf --hf_dir=DIR --workdir=RUN --config.mesh.fsdp=-1 \
      --coordinator_address=HOST:PORT --num_processes=N --process_id=I
"""

from absl import flags, logging
from ml_collections import config_flags

from ftjax.configs import resolve
from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", cli.config_path("experiments/hf_llama.py"),
                                          "Experiment config (the model's architecture is "
                                          "replaced by the checkpoint's).", lock_config=True)
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (gs:// and s3:// "
                              "too: copied to the local cache folder first).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to create (gs:// and s3:// too).")
_DISTRIBUTED = cli.DistributedFlags()


def main(argv):
  cli.no_extra_args(argv)
  if not _HF_DIR.value or not _WORKDIR.value:
    cli.fail("flag error: --hf_dir and --workdir are required")
  cli.check_paths(buckets_ok=[("workdir", _WORKDIR.value), ("hf_dir", _HF_DIR.value)])
  from ftjax import storage
  if not storage.isdir(_HF_DIR.value):
    cli.fail(f"flag error: --hf_dir={_HF_DIR.value} is not a directory")
  _DISTRIBUTED.check()
  from ftjax import hf
  try:
    base = _CONFIG.value
  except OSError as e:
    cli.fail(f"config error: cannot load the --config file: {str(e).strip().splitlines()[-1]}")
  cfg = resolve(hf.build_config(base, hf.read_config(_HF_DIR.value),
                                config_flags.get_override_values(flags.FLAGS["config"])))
  logging.set_verbosity(logging.WARNING)
  _DISTRIBUTED.start(cfg.distributed.peer_timeout_seconds)
  hf.import_run(_HF_DIR.value, _WORKDIR.value, cfg)


if __name__ == "__main__":
  cli.run(main)
