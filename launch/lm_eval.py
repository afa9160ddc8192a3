"""Evaluate a run with lm-evaluation-harness (needs `pip install -r requirements-hf.txt`).

  python -m launch.lm_eval --workdir=RUN --tasks=hellaswag,arc_easy [--num_fewshot=0]
      [--limit=100] [--include_path=DIR] [--output_path=DIR] [--log_samples] [--batch_size=8]
      [--z_mode=uniform|fixed|encoder] [--code=N] [--seed=0] [--max_length=N] [--add_bos_token]
      [--confirm_run_unsafe_code] [--apply_chat_template [--chat_template=NAME]
      --fewshot_as_multiturn --system_instruction=TEXT]

The model is `ftjax.harness.FtjaxLM` ("ftjax" in lm_eval's registry): log-likelihoods with a
full forward pass, generation with the KV cache. --z_mode picks a Free Transformer's Z: a code
drawn uniformly per token (default, as in the paper's evaluation), one fixed code per request,
or the encoder's codes over the context with uniform codes for what is scored or generated.
Tasks come from lm_eval (downloaded by `datasets`: needs network) or from YAML files under
--include_path. Prints lm_eval's table; --output_path writes its results JSON (and with
--log_samples the per-sample JSON lines). --apply_chat_template writes every prompt in the
imported checkpoint's chat template (its tokenizer's `chat_template.jinja` or
tokenizer_config.json entry; ftjax.chat_template renders it as transformers does), with the
few-shot examples as turns of the conversation (--fewshot_as_multiturn, default on) and
--system_instruction as the system message.
"""

import shutil
import tempfile

from absl import flags, logging

from launch import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_TASKS = flags.DEFINE_list("tasks", None, "lm_eval task or group names.")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: the "
                                    "task's).")
_LIMIT = flags.DEFINE_float("limit", None, "Examples per task (< 1: a fraction).")
_INCLUDE_PATH = flags.DEFINE_string("include_path", None, "A directory of task YAML files.")
_OUTPUT_PATH = flags.DEFINE_string("output_path", None, "Where lm_eval writes results (a "
                                   "folder; gs:// and s3:// too).")
_LOG_SAMPLES = flags.DEFINE_bool("log_samples", False, "Also write per-sample results.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Requests per forward pass.")
_Z_MODE = flags.DEFINE_enum("z_mode", "uniform", ["uniform", "fixed", "encoder"],
                            "How a Free Transformer's Z is chosen.")
_CODE = flags.DEFINE_integer("code", None, "With --z_mode=fixed: the code (default: one drawn "
                             "per request).")
_MESH = cli.define_restore_mesh()
_SEED = flags.DEFINE_integer("seed", 0, "Seed for Z (and sampling, when a task samples).")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Tokens per forward pass (default: the "
                                   "imported checkpoint's max_position_embeddings, else "
                                   "model.seq_len).")
_ADD_BOS = flags.DEFINE_bool("add_bos_token", False, "Prepend BOS to every context.")
_UNSAFE = flags.DEFINE_bool("confirm_run_unsafe_code", False, "Let code tasks (humaneval, "
                            "mbpp) execute the generated code (also set HF_ALLOW_CODE_EVAL=1).")
_CHAT = flags.DEFINE_bool("apply_chat_template", False, "Write prompts in the checkpoint's "
                          "chat template.")
_CHAT_NAME = flags.DEFINE_string("chat_template", None, "With --apply_chat_template: the name "
                                 "of one of several templates (default: 'default').")
_MULTITURN = flags.DEFINE_bool("fewshot_as_multiturn", True, "With --apply_chat_template: "
                               "few-shot examples as turns of the conversation.")
_SYSTEM = flags.DEFINE_string("system_instruction", None, "A system instruction for every "
                              "prompt.")


def _check_chat_template(workdir):
  """Fails in one line when --apply_chat_template cannot work on this run."""
  from ftjax import chat_template, hf
  from ftjax.errors import ChatTemplateError
  tokenizer = hf.run_tokenizer(workdir)
  if tokenizer is None:
    cli.fail(f"flag error: --apply_chat_template: {workdir} has no Hugging Face tokenizer "
             "(hf_tokenizer/), so no chat template")
  try:
    chat_template.pick(tokenizer.chat_templates, _CHAT_NAME.value)
  except ChatTemplateError as e:
    cli.fail(f"flag error: --apply_chat_template: {e}")


def main(argv):
  cli.no_extra_args(argv)
  if not _WORKDIR.value:
    cli.fail("flag error: --workdir is required")
  if not _TASKS.value:
    cli.fail("flag error: --tasks is required")
  if _BATCH_SIZE.value < 1:
    cli.fail("flag error: --batch_size must be >= 1")
  if _CODE.value is not None and _Z_MODE.value != "fixed":
    cli.fail("flag error: --code needs --z_mode=fixed")
  cli.check_paths(runs=[("workdir", _WORKDIR.value)],
                  buckets_ok=[("output_path", _OUTPUT_PATH.value)],
                  others=[("include_path", _INCLUDE_PATH.value)])
  logging.set_verbosity(logging.WARNING)  # datasets and orbax log at INFO
  try:
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table
  except ImportError:
    cli.fail("import error: lm_eval is not installed: pip install -r requirements-hf.txt")
  task_manager = TaskManager(include_path=_INCLUDE_PATH.value)
  missing = [t for t in _TASKS.value if not task_manager.match_tasks([t])]
  if missing:
    cli.fail(f"flag error: unknown lm_eval task(s) {missing} (see `lm_eval ls tasks`, or "
             "--include_path for your own YAML)")
  if _CHAT_NAME.value and not _CHAT.value:
    cli.fail("flag error: --chat_template needs --apply_chat_template")
  if _CHAT.value:
    _check_chat_template(_WORKDIR.value)
  restored = cli.restored_run(argv, _WORKDIR.value, _STEP.value, _MESH.value)
  from ftjax.errors import FtjaxError
  from ftjax.harness import FtjaxLM
  try:
    lm = FtjaxLM(_WORKDIR.value, z_mode=_Z_MODE.value, code=_CODE.value, seed=_SEED.value,
                 batch_size=_BATCH_SIZE.value, max_length=_MAX_LENGTH.value,
                 add_bos_token=_ADD_BOS.value, restored=restored)
  except FtjaxError:  # its own one line (cli.run)
    raise
  except ValueError as e:  # a --z_mode / --code the run cannot take
    cli.fail(f"flag error: {e}")
  from ftjax import storage
  output_path = _OUTPUT_PATH.value  # a bucket's: written to a local folder, uploaded at the end
  local_output = tempfile.mkdtemp(prefix="ftjax-lm-eval-") if storage.is_url(output_path) else \
      output_path
  tracker = EvaluationTracker(output_path=local_output) if output_path else None
  results = lm_eval.simple_evaluate(
      model=lm, tasks=_TASKS.value, num_fewshot=_NUM_FEWSHOT.value, limit=_LIMIT.value,
      batch_size=_BATCH_SIZE.value, log_samples=_LOG_SAMPLES.value, evaluation_tracker=tracker,
      task_manager=task_manager, random_seed=_SEED.value,
      confirm_run_unsafe_code=_UNSAFE.value,
      apply_chat_template=(_CHAT_NAME.value or True) if _CHAT.value else False,
      fewshot_as_multiturn=_MULTITURN.value and _CHAT.value,
      system_instruction=_SYSTEM.value)
  samples = results.pop("samples", None)
  if tracker is not None:
    tracker.general_config_tracker.model_name = f"ftjax:{_WORKDIR.value}"
    tracker.save_results_aggregated(results=results,
                                    samples=samples if _LOG_SAMPLES.value else None)
    if _LOG_SAMPLES.value:
      for task_name in results["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    if local_output != output_path:
      storage.upload_tree(local_output, output_path)
      shutil.rmtree(local_output, ignore_errors=True)
  print(f"ftjax {_WORKDIR.value} step {restored.step}, z_mode {lm.z_mode}, num_fewshot "
        f"{_NUM_FEWSHOT.value}, limit {_LIMIT.value}, chat template "
        f"{(_CHAT_NAME.value or 'default') if _CHAT.value else 'off'}")
  print(make_table(results))
  if "groups" in results:
    print(make_table(results, "groups"))


if __name__ == "__main__":
  cli.run(main)
