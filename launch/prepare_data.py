"""Tokenise a corpus into array_record shards for `--config.data.name=prepared`.

  python -m launch.prepare_data --input='corpus/*.jsonl.gz' --output=data/corpus \
      --tokenizer=path/to/tokenizer.json [--text_key=text] [--format=auto|jsonl|parquet|text] \
      [--text_unit=file|line] [--num_workers=N] [--docs_per_shard=10000] [--validation_every=100]

Inputs: JSON lines (plain or .gz; the document is the `--text_key` field), Parquet (the
`--text_key` column) or plain text (one document per file, or per non-empty line with
`--text_unit=line`); `--format=auto` goes by the file extension. `--tokenizer`: `bytes`, a
sentencepiece `.model` file, or a Hugging Face `tokenizer.json` (or its directory). Every
`--validation_every`-th document of each file is held out for validation (a file with fewer
documents: the last 1/validation_every of its text). Re-running with the
same flags skips finished shards; metadata.json is written last. Inputs and output may be gs://
or s3:// URLs (the output is staged locally chunk by chunk and uploaded). Bad input exits 2 with
one line.
"""

import os

from absl import flags

from launch import cli

_INPUT = flags.DEFINE_string("input", None, "Glob of input files (** allowed; gs:// and s3:// "
                             "too).")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (created; gs:// and s3:// too).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "bytes", "bytes | sentencepiece .model file | "
                                 "Hugging Face tokenizer.json or its directory.")
_EOS_TOKEN = flags.DEFINE_string("eos_token", "", "Hugging Face tokenizers: the end-of-document "
                                 "token (default: tokenizer_config.json's, or a known one).")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "JSON lines / Parquet: the text field.")
_FORMAT = flags.DEFINE_enum("format", "auto", ["auto", "jsonl", "parquet", "text"],
                            "Input format (auto: by extension).")
_TEXT_UNIT = flags.DEFINE_enum("text_unit", "file", ["file", "line"],
                               "Plain text: one document per file or per non-empty line.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                    "Tokenising processes (1: in this process).")
_DOCS_PER_SHARD = flags.DEFINE_integer("docs_per_shard", 10_000, "Documents per chunk (one "
                                       "train and one validation shard each).")
_VALIDATION_EVERY = flags.DEFINE_integer("validation_every", 100, "Hold out every N-th "
                                         "document of each file for validation (a file with "
                                         "fewer: the last 1/N of its text).")


def main(argv):
  cli.no_extra_args(argv)
  if not _INPUT.value or not _OUTPUT.value:
    cli.fail("flag error: --input and --output are required")
  cli.check_paths(buckets_ok=[("output", _OUTPUT.value)], globs=[("input", _INPUT.value)],
                  others=[("tokenizer", _TOKENIZER.value)])
  from ftjax.data import prepared
  try:
    settings = prepared.Settings(
        inputs=tuple(prepared.match_inputs(_INPUT.value)), tokenizer=_TOKENIZER.value,
        eos_token=_EOS_TOKEN.value, format=_FORMAT.value, text_key=_TEXT_KEY.value,
        text_unit=_TEXT_UNIT.value, docs_per_shard=_DOCS_PER_SHARD.value,
        validation_every=_VALIDATION_EVERY.value)
    prepared.eprint(f"{len(settings.inputs)} input files -> {_OUTPUT.value}")
    meta = prepared.prepare(settings, _OUTPUT.value, max(_NUM_WORKERS.value, 1),
                            progress=prepared.eprint)
  except KeyboardInterrupt:
    cli.fail("interrupted: run the same command again to resume", status=130)
  for line in prepared.summary(meta):
    print(line)


if __name__ == "__main__":
  cli.run(main)
