"""Hugging Face Llama checkpoints in and out: config mapping, safetensors reading and writing,
loading into a sharded train state, exporting a run.

Only numpy (and ml_dtypes, which jax brings) is needed: safetensors files are read through
memory maps, one tensor (or one shard of one) at a time, and written tensor by tensor.

Parameter mapping (HF name → ftjax path; D width, N/K query/key-value heads, E head dim,
F MLP hidden, V vocabulary):

    model.embed_tokens.weight [V, D]            → embed [V, D]
    model.layers.i.input_layernorm.weight       → <block>/attn_norm/scale
    model.layers.i.self_attn.q_proj.weight [N·E, D] → <block>/attn/query/kernel [D, N, E]
    model.layers.i.self_attn.k_proj/v_proj [K·E, D] → <block>/attn/key|value/kernel [D, K, E]
    model.layers.i.self_attn.o_proj.weight [D, N·E] → <block>/attn/out/kernel [N, E, D]
    model.layers.i.post_attention_layernorm.weight  → <block>/mlp_norm/scale
    model.layers.i.mlp.gate_proj/up_proj [F, D] → <block>/mlp/gate|up/kernel [D, F]
    model.layers.i.mlp.down_proj.weight [D, F]  → <block>/mlp/down/kernel [F, D]
    model.norm.weight                           → final_norm/scale
    lm_head.weight [V, D]                       → unembed/kernel [D, V] (none when tied)

<block> of HF layer i: layers_lo[i] for i < I, inject_block for i = I, layers_hi[i − I − 1]
after it (I = model.latent.inject_layer). Hugging Face's Llama already uses the rotate-half RoPE
convention that ftjax uses, so q/k need no permutation. A checkpoint with
`tie_word_embeddings` imports with `model.tie_embeddings=True` (logits from the embedding, no
unembed parameter) and exports tied again; `--config.model.tie_embeddings=False` unties it on
import (unembed = embed_tokens transposed, then trained separately; export writes `lm_head`).

A Free Transformer's latent path (`params["latent"]`) is exported in ftjax's own layout under
the prefix `ftjax_latent.` with the latent config under the `ftjax` key of config.json; an HF
Llama loader ignores both (it warns about unexpected keys) and computes the decoder with R = 0.
"""

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Optional, Sequence

import ml_dtypes
import numpy as np

from ftjax import chat_template, storage
from ftjax.errors import HFError
from ftjax.run import (CONFIG_PY, HF_CONFIG_FILE, HF_TOKENIZER_DIR as TOKENIZER_DIR, checkpoints_dir,
                       write_config, write_run_checksums)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")
LATENT_PREFIX = "ftjax_latent."
FTJAX_KEY = "ftjax"
# Keys of config.json that decide the ftjax model; a user override must agree with them.
ARCH_KEYS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
             "vocab_size", "rope_theta", "norm_eps")

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
# Tensors some checkpoints carry that hold no parameters (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# (name, shape, dtype, fetch): one tensor to write; fetch() returns its array.
TensorSpec = tuple[str, tuple, Any, Callable[[], Any]]


# ----------------------------------------------------------------------------- safetensors

class SafetensorsFile:
  """One .safetensors file read through a memory map: `get(name)` is a zero-copy view."""

  def __init__(self, path: str) -> None:
    with open(path, "rb") as f:
      size = int.from_bytes(f.read(8), "little")
      try:
        header = json.loads(f.read(size))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{path}: not a safetensors file ({e})") from e
    header.pop("__metadata__", None)
    self.path, self.header, self._base = path, header, 8 + size
    self._map = np.memmap(path, np.uint8, "r") if header else None

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    if info["dtype"] not in _DTYPES:
      raise HFError(f"{self.path}: tensor {name} has dtype {info['dtype']}, which ftjax does "
                    "not read")
    begin, end = info["data_offsets"]
    data = self._map[self._base + begin:self._base + end]
    return data.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


class Checkpoint:
  """A Hugging Face model directory: config.json and safetensors weights, one file
  (model.safetensors) or sharded (model.safetensors.index.json)."""

  def __init__(self, hf_dir: str) -> None:
    self.dir = hf_dir
    self.config = read_config(hf_dir)
    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(hf_dir, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      bins = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth"))]
      raise HFError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}" +
                    (f" (PyTorch pickles such as {bins[0]} are not read: convert them to "
                     "safetensors)" if bins else ""))
    self._files = {}
    self._where = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      if not os.path.exists(path):
        raise HFError(f"{hf_dir}: {name} (listed in {INDEX_FILE}) is missing")
      sf = SafetensorsFile(path)
      self._files[name] = sf
      for tensor in sf.header:
        self._where[tensor] = sf

  def names(self) -> set[str]:
    return set(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name].header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    return self._where[name].get(name)


def write_safetensors(path: str, tensors: Sequence[TensorSpec],
                      metadata: Optional[dict] = None) -> None:
  """Writes [(name, shape, dtype, fetch)] to `path`, calling each fetch() (→ numpy array) only
  when its bytes are written, so at most one tensor is on the host at a time."""
  header, offset = {}, 0
  for name, shape, dtype, _ in tensors:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  with open(path + ".tmp", "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name, shape, dtype, fetch in tensors:
      array = np.ascontiguousarray(np.asarray(fetch(), dtype=dtype))
      if array.shape != tuple(shape):
        raise ValueError(f"{name}: shape {array.shape}, header says {tuple(shape)}")
      f.write(array.tobytes())
  os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- config

def read_config(hf_dir: str) -> dict:
  """The checkpoint's config.json (`hf_dir` may be a bucket prefix: this file alone is read)."""
  path = storage.join(hf_dir, CONFIG_FILE)
  try:
    return json.loads(storage.read_bytes(path))
  except FileNotFoundError as e:
    raise HFError(f"{path} not found: --hf_dir must be a Hugging Face model directory") from e
  except json.JSONDecodeError as e:
    raise HFError(f"{path} is not valid JSON: {e}") from e


def _rope(hf: dict) -> tuple[float, dict]:
  """(theta, rope_scaling fields) from either config style: `rope_theta` + `rope_scaling`
  (transformers 4) or `rope_parameters` (transformers 5)."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  source = params if params.get("rope_type") else scaling
  if kind == "default":
    return float(theta), {"type": "none"}
  if kind != "llama3":
    raise HFError(f"unsupported RoPE scaling rope_type={kind!r}: ftjax implements the default "
                  "RoPE and Llama 3's 'llama3' scaling")
  try:
    return float(theta), {
        "type": "llama3", "factor": float(source["factor"]),
        "low_freq_factor": float(source["low_freq_factor"]),
        "high_freq_factor": float(source["high_freq_factor"]),
        "original_max_position_embeddings": int(source["original_max_position_embeddings"])}
  except KeyError as e:
    raise HFError(f"rope_type 'llama3' without {e.args[0]} in config.json") from e


def model_fields(hf: dict) -> dict:
  """The ftjax `model` fields (flat dict, `rope_scaling` a dict) of an HF Llama config; HFError
  for anything ftjax would not compute the same way."""
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or ["LlamaForCausalLM"]
  if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
    raise HFError(f"unsupported architecture (model_type={model_type!r}, architectures={archs}): "
                  "ftjax imports Llama-architecture checkpoints (model_type 'llama')")
  for key, bad in (("attention_bias", True), ("mlp_bias", True)):
    if hf.get(key, False) == bad:
      raise HFError(f"{key}=true: ftjax's Llama has no biases")
  if hf.get("hidden_act", "silu") != "silu":
    raise HFError(f"hidden_act={hf['hidden_act']!r}: ftjax's MLP is SwiGLU (silu)")
  if hf.get("quantization_config"):
    raise HFError("quantized checkpoints are not supported (quantization_config is set)")
  try:
    d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    fields = {"num_layers": int(hf["num_hidden_layers"]), "d_model": d, "num_heads": n,
              "num_kv_heads": int(hf.get("num_key_value_heads") or n),
              "head_dim": int(hf.get("head_dim") or d // n),
              "mlp_dim": int(hf["intermediate_size"]), "vocab_size": int(hf["vocab_size"]),
              "norm_eps": float(hf.get("rms_norm_eps", 1e-6))}
  except KeyError as e:
    raise HFError(f"config.json has no {e.args[0]}") from e
  if d % n:
    raise HFError(f"hidden_size={d} is not a multiple of num_attention_heads={n} (ftjax needs it)")
  if fields["head_dim"] % 2:
    raise HFError(f"head_dim={fields['head_dim']} is odd: RoPE needs an even head dim")
  fields["rope_theta"], fields["rope_scaling"] = _rope(hf)
  fields["tie_embeddings"] = bool(hf.get("tie_word_embeddings", False))
  return fields


def latent_fields(hf: dict) -> dict:
  """`model.latent` fields a Free Transformer export stored under config.json's `ftjax` key."""
  return dict((hf.get(FTJAX_KEY) or {}).get("latent") or {})


def hf_config(m: Any, base: Optional[dict] = None, latent: Optional[dict] = None) -> dict:
  """An HF Llama config.json dict for the resolved model config `m` (keys of `base`, the
  imported checkpoint's config, kept where they do not describe the model)."""
  out = {k: v for k, v in (base or {}).items()
         if k not in ("rope_parameters", "rope_scaling", "rope_theta", "torch_dtype", "dtype",
                      "tie_word_embeddings", FTJAX_KEY, "transformers_version", "head_dim")}
  out.update({
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": m.d_model, "intermediate_size": m.mlp_dim,
      "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
      "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
      "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
      "tie_word_embeddings": bool(m.tie_embeddings), "torch_dtype": "float32"})
  out.setdefault("max_position_embeddings", m.seq_len)
  r = m.get("rope_scaling")
  out["rope_scaling"] = None
  if r is not None and r.type == "llama3":
    out["rope_scaling"] = {"rope_type": "llama3", "factor": r.factor,
                           "low_freq_factor": r.low_freq_factor,
                           "high_freq_factor": r.high_freq_factor,
                           "original_max_position_embeddings": r.original_max_position_embeddings}
  if latent is not None:
    out[FTJAX_KEY] = {"latent": latent, "note": "Free Transformer latent path: tensors "
                      f"'{LATENT_PREFIX}*' in ftjax's layout; read by ftjax's launch.import_hf"}
  return out


# ----------------------------------------------------------------------------- mapping

def _layer_tensors(i: int) -> dict[tuple[str, ...], str]:
  p = f"model.layers.{i}."
  return {("attn_norm", "scale"): p + "input_layernorm.weight",
          ("attn", "query", "kernel"): p + "self_attn.q_proj.weight",
          ("attn", "key", "kernel"): p + "self_attn.k_proj.weight",
          ("attn", "value", "kernel"): p + "self_attn.v_proj.weight",
          ("attn", "out", "kernel"): p + "self_attn.o_proj.weight",
          ("mlp_norm", "scale"): p + "post_attention_layernorm.weight",
          ("mlp", "gate", "kernel"): p + "mlp.gate_proj.weight",
          ("mlp", "up", "kernel"): p + "mlp.up_proj.weight",
          ("mlp", "down", "kernel"): p + "mlp.down_proj.weight"}


def _to_ftjax(m: Any, sub: tuple[str, ...]) -> Callable[[np.ndarray], np.ndarray]:
  """HF array → ftjax layout (views, no copies) for the block parameter `sub`."""
  n, k, e = m.num_heads, m.num_kv_heads, m.head_dim
  if sub == ("attn", "query", "kernel"):
    return lambda w: w.reshape(n, e, -1).transpose(2, 0, 1)
  if sub in (("attn", "key", "kernel"), ("attn", "value", "kernel")):
    return lambda w: w.reshape(k, e, -1).transpose(2, 0, 1)
  if sub == ("attn", "out", "kernel"):
    return lambda w: w.reshape(-1, n, e).transpose(1, 2, 0)
  if sub[0] == "mlp":
    return lambda w: w.T
  return lambda w: w


def _to_hf(m: Any, sub: tuple[str, ...]) -> Callable[[np.ndarray], np.ndarray]:
  """ftjax array → HF layout for the block parameter `sub` (inverse of `_to_ftjax`)."""
  n, k, e = m.num_heads, m.num_kv_heads, m.head_dim
  if sub == ("attn", "query", "kernel"):
    return lambda w: w.transpose(1, 2, 0).reshape(n * e, -1)
  if sub in (("attn", "key", "kernel"), ("attn", "value", "kernel")):
    return lambda w: w.transpose(1, 2, 0).reshape(k * e, -1)
  if sub == ("attn", "out", "kernel"):
    return lambda w: w.transpose(2, 0, 1).reshape(-1, n * e)
  if sub[0] == "mlp":
    return lambda w: w.T
  return lambda w: w


def hf_shape(m: Any, sub: tuple[str, ...]) -> tuple[int, ...]:
  """The HF tensor shape of block parameter `sub`."""
  d, n, k, e, f = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
  return {("attn_norm", "scale"): (d,), ("mlp_norm", "scale"): (d,),
          ("attn", "query", "kernel"): (n * e, d), ("attn", "key", "kernel"): (k * e, d),
          ("attn", "value", "kernel"): (k * e, d), ("attn", "out", "kernel"): (d, n * e),
          ("mlp", "gate", "kernel"): (f, d), ("mlp", "up", "kernel"): (f, d),
          ("mlp", "down", "kernel"): (d, f)}[sub]


def block_layers(m: Any) -> dict[str, list[int]]:
  """{ftjax block-stack name: the HF layer indices it holds, in order}."""
  inject = m.latent.inject_layer
  out = {"layers_lo": list(range(inject)), "inject_block": [inject],
         "layers_hi": list(range(inject + 1, m.num_layers))}
  return {k: v for k, v in out.items() if v}


def param_map(m: Any, tied: bool) -> dict[tuple[str, ...], tuple]:
  """{ftjax param path (tuple): (HF names: a str, or a list over the stacked layers axis,
  to_ftjax(array) -> array, HF shape)} for every decoder parameter."""
  out = {("embed",): ("model.embed_tokens.weight", lambda w: w, (m.vocab_size, m.d_model)),
         ("final_norm", "scale"): ("model.norm.weight", lambda w: w, (m.d_model,))}
  if not m.tie_embeddings:  # a tied checkpoint untied on import: unembed from the embedding
    out[("unembed", "kernel")] = ("model.embed_tokens.weight" if tied else "lm_head.weight",
                                  lambda w: w.T, (m.vocab_size, m.d_model))
  for stack, layers in block_layers(m).items():
    for sub in _layer_tensors(0):
      names = [_layer_tensors(i)[sub] for i in layers]
      path = (stack, "block") + sub if stack != "inject_block" else (stack,) + sub
      out[path] = (names if stack != "inject_block" else names[0], _to_ftjax(m, sub),
                   hf_shape(m, sub))
  return out


def check_tensors(ckpt: Checkpoint, m: Any, tied: bool) -> None:
  """HFError naming the first missing, mis-shaped or unexpected tensor of `ckpt`."""
  wanted = {}
  for names, _, shape in param_map(m, tied).values():
    for name in ([names] if isinstance(names, str) else names):
      wanted[name] = shape
  have = ckpt.names()
  for name, shape in wanted.items():
    if name not in have:
      raise HFError(f"tensor {name} is missing from the checkpoint")
    if ckpt.shape(name) != tuple(shape):
      raise HFError(f"tensor {name} has shape {ckpt.shape(name)}, config.json implies "
                    f"{tuple(shape)}")
  for name in sorted(have - set(wanted)):
    if name.startswith(LATENT_PREFIX) or name.endswith(_IGNORED_SUFFIXES):
      continue
    if tied and name == "lm_head.weight":
      continue
    raise HFError(f"tensor {name} in the checkpoint has no place in ftjax's Llama "
                  "(a bias or another architecture?)")


def _path(keypath: tuple) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in keypath)


def load_params(ckpt: Checkpoint, m: Any, params: Any, tied: bool) -> Any:
  """`params` (a sharded pytree of jax arrays, e.g. a fresh init) with every decoder parameter
  replaced by the checkpoint's and, when the checkpoint holds them (an ftjax export), the latent
  path's. Each array is built shard by shard from memory-mapped tensors straight into the
  sharding of the array it replaces (`jax.make_array_from_callback`): no full host copy."""
  import jax
  mapping = param_map(m, tied)
  names = ckpt.names()

  def build(leaf, fetch_rows, stacked):
    def shard(index):
      if not stacked:
        return np.asarray(fetch_rows(None)[index], leaf.dtype)
      rows = range(*index[0].indices(leaf.shape[0]))
      return np.stack([np.asarray(fetch_rows(j)[index[1:]], leaf.dtype) for j in rows])
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, shard)

  def replace(keypath, leaf):
    path = _path(keypath)
    if path in mapping:
      hf_names, convert, _ = mapping[path]
      if isinstance(hf_names, str):
        return build(leaf, lambda _: convert(ckpt.get(hf_names)), False)
      return build(leaf, lambda j: convert(ckpt.get(hf_names[j])), True)
    if path[0] == "latent":
      name = LATENT_PREFIX + ".".join(path[1:])
      if name in names:
        if ckpt.shape(name) != tuple(leaf.shape):
          raise HFError(f"tensor {name} has shape {ckpt.shape(name)}, the config builds "
                        f"{tuple(leaf.shape)} (model.latent settings differ from the export's)")
        return build(leaf, lambda _: ckpt.get(name), False)
      return leaf  # freshly initialised latent path (zero post-sampler: the FT = the decoder)
    raise HFError(f"ftjax parameter {'/'.join(path)} has no Hugging Face tensor")

  return jax.tree_util.tree_map_with_path(replace, params)


def export_tensors(params: Any, m: Any) -> list[TensorSpec]:
  """[(name, shape, dtype, fetch)] of a run's parameters in HF layout (float32), latent path
  under LATENT_PREFIX; fetch() copies one tensor to the host."""
  out = [("model.embed_tokens.weight", (m.vocab_size, m.d_model), np.float32,
          lambda: np.asarray(params["embed"]))]
  tensors = {}
  for stack, layers in block_layers(m).items():
    for sub, _ in _layer_tensors(0).items():
      node = params[stack] if stack == "inject_block" else params[stack]["block"]
      for sub_key in sub:
        node = node[sub_key]
      for j, i in enumerate(layers):
        leaf = node if stack == "inject_block" else node[j]
        tensors[_layer_tensors(i)[sub]] = (hf_shape(m, sub), _to_hf(m, sub), leaf)
  for i in range(m.num_layers):
    for sub in _layer_tensors(0):
      name = _layer_tensors(i)[sub]
      shape, convert, leaf = tensors[name]
      out.append((name, shape, np.float32,
                  lambda convert=convert, leaf=leaf: convert(np.asarray(leaf))))
  out.append(("model.norm.weight", (m.d_model,), np.float32,
              lambda: np.asarray(params["final_norm"]["scale"])))
  if not m.tie_embeddings:
    out.append(("lm_head.weight", (m.vocab_size, m.d_model), np.float32,
                lambda: np.asarray(params["unembed"]["kernel"]).T))
  if "latent" in params:
    import jax
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(params["latent"]):
      out.append((LATENT_PREFIX + ".".join(_path(keypath)), tuple(leaf.shape), np.float32,
                  lambda leaf=leaf: np.asarray(leaf)))
  return out


def latent_config_dict(m: Any) -> dict:
  """The `model.latent` fields an export stores (inject_layer and kappa in nats resolved)."""
  lat = m.latent.to_dict() if hasattr(m.latent, "to_dict") else dict(m.latent)
  return {k: v for k, v in lat.items() if k != "kappa_bits"}


def export(params: Any, m: Any, out_dir: str, run_dir: Optional[str] = None) -> None:
  """Writes a run's parameters (resolved model config `m`) to `out_dir` as an HF Llama model
  directory: config.json, model.safetensors, and the run's tokenizer files when it has them.
  `out_dir` may be a gs:// or s3:// prefix (written locally first, then uploaded, config.json
  last); `run_dir` may be a bucket run."""
  if storage.is_url(out_dir):
    stage = tempfile.mkdtemp(prefix="ftjax-export-")
    try:
      export(params, m, stage, run_dir)
      storage.upload_tree(stage, out_dir, last=(CONFIG_FILE,))
    finally:
      shutil.rmtree(stage, ignore_errors=True)
    return
  os.makedirs(out_dir, exist_ok=True)
  base = saved_hf_config(run_dir) if run_dir else {}
  latent = latent_config_dict(m) if m.latent.enabled else None
  write_safetensors(os.path.join(out_dir, SINGLE_FILE), export_tensors(params, m),
                    metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(hf_config(m, base or None, latent), f, indent=2, sort_keys=True)
  if run_dir:
    copy_tokenizer(storage.join(run_dir, TOKENIZER_DIR), out_dir)


def copy_tokenizer(src_dir: str, dst_dir: str) -> list[str]:
  """Copies the tokenizer files of `src_dir` (those that exist) to `dst_dir` (either may be on a
  bucket); returns them."""
  copied = []
  for name in TOKENIZER_FILES:
    if storage.exists(storage.join(src_dir, name)):
      storage.makedirs(dst_dir)
      storage.write_bytes(storage.join(dst_dir, name),
                          storage.read_bytes(storage.join(src_dir, name)))
      copied.append(name)
  return copied


def saved_hf_config(run_dir: str) -> dict:
  """The HF config.json an imported run keeps (RUN/hf_config.json); {} when it has none."""
  return _read_json(storage.join(run_dir, HF_CONFIG_FILE))


def _read_json(path: str) -> dict:
  if not storage.exists(path):
    return {}
  return json.loads(storage.read_bytes(path))


def _token_text(token: Any) -> Any:
  """A special token of tokenizer_config.json as text ({"content": ...} entries unwrapped)."""
  if isinstance(token, dict):
    return token.get("content")
  if isinstance(token, list):
    return [_token_text(t) for t in token]
  return token


class RunTokenizer:
  """A run's Hugging Face tokenizer (`RUN/hf_tokenizer/tokenizer.json`, read with the
  `tokenizers` library): encode(text) → ids without special tokens, decode(ids), bos/eos ids,
  and the checkpoint's chat templates (`apply_chat_template`, see ftjax.chat_template)."""

  def __init__(self, run_dir: str) -> None:
    import tokenizers
    directory = storage.local_tree(storage.join(run_dir, TOKENIZER_DIR))  # a bucket run's: copied
    self._tok = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    special = {**_read_json(os.path.join(directory, "special_tokens_map.json")), **config}
    # The template's variables: bos_token, eos_token, ..., additional_special_tokens.
    self.special_tokens = {k: _token_text(v) for k, v in special.items()
                           if k.endswith("_token") or k == "additional_special_tokens"}
    self.bos_id = self._special_id(self.special_tokens.get("bos_token"))
    self.eos_id = self._special_id(self.special_tokens.get("eos_token"))
    self.chat_templates = chat_template.load_templates(directory, config)

  def _special_id(self, token: Optional[str]) -> Optional[int]:
    return None if token is None else self._tok.token_to_id(token)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                          continue_final_message: bool = False,
                          name: Optional[str] = None) -> str:
    """`messages` as text in the checkpoint's chat template (`name`: one of several named
    templates); ChatTemplateError when there is none or it fails."""
    return chat_template.render(chat_template.pick(self.chat_templates, name), messages,
                                add_generation_prompt, continue_final_message,
                                **self.special_tokens)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def run_tokenizer(run_dir: str) -> Optional[RunTokenizer]:
  """The run's HF tokenizer, or None when the run has none (then the run's data tokenizer)."""
  if not storage.exists(storage.join(run_dir, TOKENIZER_DIR, "tokenizer.json")):
    return None
  return RunTokenizer(run_dir)


# ----------------------------------------------------------------------------- import

def build_config(base: Any, hf: dict, overrides: Optional[dict] = None) -> Any:
  """The (unresolved) ftjax config of an import: `base` (an experiment config, with the user's
  overrides applied), the checkpoint's architecture on top, then a Free Transformer export's
  latent settings where the user did not override them. `overrides` ({dotted key: value}) are
  the user's own: one that contradicts the checkpoint's architecture is an HFError."""
  overrides = dict(overrides or {})
  fields = model_fields(hf)
  cfg = base.copy_and_resolve_references()
  cfg.unlock()
  for key in ARCH_KEYS:
    given = overrides.get(f"model.{key}")
    if given is not None and given != fields[key] and not (key == "head_dim" and given == 0):
      raise HFError(f"--config.model.{key}={given} contradicts the checkpoint "
                    f"({fields[key]}); architecture keys come from config.json")
    cfg.model[key] = fields[key]
  tie = overrides.get("model.tie_embeddings")
  if tie and not fields["tie_embeddings"]:
    raise HFError("--config.model.tie_embeddings=True: the checkpoint has its own lm_head "
                  "(tie_word_embeddings is false)")
  cfg.model.tie_embeddings = fields["tie_embeddings"] if tie is None else bool(tie)
  for key, value in fields["rope_scaling"].items():
    given = overrides.get(f"model.rope_scaling.{key}")
    if given is not None and given != value:
      raise HFError(f"--config.model.rope_scaling.{key}={given} contradicts the checkpoint "
                    f"({value})")
    cfg.model.rope_scaling[key] = value
  latent = latent_fields(hf)
  if any(k in overrides for k in ("model.latent.kappa", "model.latent.kappa_bits")):
    latent.pop("kappa", None)
  elif latent.get("kappa") is not None:
    latent["kappa_bits"] = None
  for key, value in latent.items():
    if f"model.latent.{key}" not in overrides and key in cfg.model.latent:
      cfg.model.latent[key] = value
  return cfg


def config_file_text(cfg: Any) -> str:
  """A config file (`get_config()`) that rebuilds the resolved `cfg` from the schema, for
  `launch.train --config=RUN/config.py`."""
  from ftjax.configs import _flat_keys  # the schema's flat view
  flat = _flat_keys(cfg.to_dict())
  lines = ",\n".join(f"    {k!r}: {v!r}" for k, v in sorted(flat.items()))
  return ('"""The config of a run imported from a Hugging Face checkpoint (resolved: kappa in '
          'nats).\n\n  python -m launch.train --config=RUN/config.py --workdir=RUN '
          '[--config.train.steps=N ...]\n"""\n\nfrom ftjax.configs import default_config, '
          'with_overrides\n\nVALUES = {\n' + lines + ',\n}\n\n\ndef get_config():\n'
          '  return with_overrides(default_config(), VALUES)\n')


def _write_run_files(hf_dir: str, workdir: str, cfg: Any, hf_config_dict: dict) -> list[str]:
  """config.json, config.py, hf_config.json, hf_tokenizer/ and run_checksums.json of an
  imported run; returns the tokenizer files copied."""
  write_config(workdir, cfg)
  storage.write_bytes(storage.join(workdir, CONFIG_PY), config_file_text(cfg).encode())
  storage.write_bytes(storage.join(workdir, HF_CONFIG_FILE),
                      json.dumps(hf_config_dict, indent=2, sort_keys=True).encode())
  copied = copy_tokenizer(hf_dir, storage.join(workdir, TOKENIZER_DIR))
  write_run_checksums(workdir)
  return copied


def import_run(hf_dir: str, workdir: str, cfg: Any, log: Callable[[str], Any] = print) -> Any:
  """Writes `workdir` as a run directory holding the checkpoint in `hf_dir` at step 0 (fresh
  optimizer state; a fresh latent path unless the checkpoint is an ftjax export): config.json,
  config.py, hf_config.json, hf_tokenizer/ and checkpoints/0. `cfg` is resolved (see
  `build_config`). Returns the train state.

  In a multi-process run (jax.distributed started) every process calls it with the same
  arguments: process 0 writes the run's files, each process reads only the tensor shards its
  devices hold, and the checkpoint is saved by all together."""
  import jax
  from ftjax import checkpoint as ckpt_lib
  from ftjax.trainer import Trainer
  ckpt = Checkpoint(storage.local_tree(hf_dir))  # a bucket's files: copied to the cache folder
  tied = bool(ckpt.config.get("tie_word_embeddings", False))
  check_tensors(ckpt, cfg.model, tied)
  checkpoints = checkpoints_dir(workdir)
  if storage.isdir(checkpoints) and storage.listdir(checkpoints):
    raise HFError(f"{workdir} already holds checkpoints: import into a new directory")
  main = jax.process_index() == 0
  copied = _write_run_files(hf_dir, workdir, cfg, ckpt.config) if main else []
  if jax.process_count() > 1:  # the others read the run's files (tokenizer) from here on
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("ftjax import_run: run files written")
  log = log if main else (lambda *_: None)
  trainer = Trainer.create(cfg, run_dir=workdir)
  state = trainer.init_state()
  state = state.replace(params=load_params(ckpt, cfg.model, state.params, tied))
  manager = ckpt_lib.Manager(checkpoints, cfg, log=log)
  # No data-stream state: training starts a fresh stream, whatever data config it then uses.
  manager.save(0, state, None)
  manager.close()
  lat = cfg.model.latent
  log(f"imported {hf_dir} ({cfg.model.num_layers} layers, d_model {cfg.model.d_model}, "
      f"{'tied' if tied else 'untied'} embeddings"
      f"{', untied on import' if tied and not cfg.model.tie_embeddings else ''}) into {workdir} "
      "at step 0; "
      + (f"latent on (H={lat.num_bits}, inject_layer={lat.inject_layer})" if lat.enabled else
         "latent off (baseline)")
      + (f"; tokenizer files: {', '.join(copied)}" if copied else "; no tokenizer files"))
  return state
