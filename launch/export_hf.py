"""Export a run as a Hugging Face Llama model directory.

  python -m launch.export_hf --workdir=RUN --out=DIR [--step=N]

Writes DIR/config.json (LlamaForCausalLM, float32; tied embeddings when the run has them),
DIR/model.safetensors and the run's tokenizer files (those import_hf copied). A baseline run
loads in `transformers` as the same model. A Free Transformer run also stores its latent path under `ftjax_latent.*` and
its latent config under config.json's `ftjax` key: `launch.import_hf` reads both back, while a
Hugging Face Llama loader ignores them (warning about unexpected keys) and computes the decoder
alone, i.e. the FT with R = 0, which is neither Z uniform nor encoder Z.
"""

from absl import flags

from launch import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (created; gs:// and s3:// too).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_MESH = cli.define_restore_mesh()


def main(argv):
  if not _OUT.value:
    cli.fail("flag error: --out is required")
  cli.check_paths(buckets_ok=[("out", _OUT.value)])
  from ftjax import storage
  if storage.exists(storage.join(_OUT.value, "config.json")):
    cli.fail(f"flag error: --out={_OUT.value} already holds a model (config.json)")
  restored = cli.restored_run(argv, _WORKDIR.value, _STEP.value, _MESH.value)
  from ftjax import hf
  hf.export(restored.params, restored.cfg.model, _OUT.value, run_dir=_WORKDIR.value)
  lat = restored.cfg.model.latent
  print(f"exported step {restored.step} of {_WORKDIR.value} to {_OUT.value}" +
        (f" (Free Transformer: latent path under {hf.LATENT_PREFIX}*)" if lat.enabled else ""))


if __name__ == "__main__":
  cli.run(main)
