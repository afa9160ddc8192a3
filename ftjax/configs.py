"""Config schema: the defaults every experiment starts from, validation and derived fields.

An experiment file (`experiments/<name>.py`) calls `default_config()`, changes fields and returns
it from `get_config()`. `resolve(cfg)` validates a config against the schema and fills derived
fields; any problem raises `ConfigError`, which the launchers turn into a one-line message and
exit status 2.
"""

import importlib
import math
import re

import ml_collections
from ml_collections import config_dict

from ftjax import storage
from ftjax.data import synthetic, text
from ftjax.data.mixture import parse_mixture
from ftjax.errors import ConfigError

# Remat policy name → the jax.checkpoint_policies attribute it uses (None: no policy argument).
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "full": None,  # recompute the whole block in the backward pass
    "dots": "checkpoint_dots",  # save the outputs of matmuls
    "dots_no_batch": "checkpoint_dots_with_no_batch_dims",  # save matmuls without batch dims
    "nothing": "nothing_saveable",  # save nothing, like "full"
}
DATASETS = ("synthetic", "shakespeare", "python_stdlib", "prepared")
LOADERS = ("memory", "grain")
DTYPES = ("float32", "bfloat16")
POST_SAMPLERS = ("onehot", "bits")
KL_CONTROLS = ("free_bits", "target_rate")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "cudnn_mask", "pallas", "splash")
MATMUL_DTYPES = ("default", "fp8")
TRACKERS = ("tensorboard", "wandb")
ONEHOT_CHUNK_BYTES = 2 * 2**30  # bound on one backward chunk of the one-hot post-sampler


FILE_SYSTEM_ONLY = ("this path is read through the file system (run directories, prepared data "
                    "and the import/export launchers' directories may be gs:// or s3://): give "
                    "a path that every process sees (local disk, NFS, Filestore, Lustre or a "
                    "mounted bucket)")


def url_error(path):
  """Why `path` cannot be used when it is a URL (gs://, s3://, ...), else None: a URL given to
  os/open would silently become a local folder named after its scheme."""
  if storage.is_url(path):
    return f"{path} is a URL; {FILE_SYSTEM_ONLY}"
  return None


def default_config():
  """The schema: every valid key with its default. Experiments override fields of this."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameters, data order and Z all follow from it

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4  # L decoder blocks (the FT adds one encoder block)
  c.model.d_model = 128  # D, the residual width
  c.model.num_heads = 4  # query heads
  c.model.num_kv_heads = 2  # key/value heads (grouped-query attention; divides num_heads)
  c.model.head_dim = 0  # 0: d_model // num_heads
  c.model.mlp_dim = 512  # F, SwiGLU hidden width
  c.model.vocab_size = 32  # V, at least the tokenizer's vocabulary
  c.model.seq_len = 64  # T, tokens per training sequence
  c.model.rope_theta = 10_000.0  # RoPE base
  c.model.norm_eps = 1e-5  # RMSNorm epsilon
  # True: the logits use the input embedding (transposed), no separate unembed parameter (as
  # Llama 3.2 1B/3B); the embedding is then initialised N(0, 1/d_model)
  c.model.tie_embeddings = False
  c.model.rope_scaling = ml_collections.ConfigDict()  # RoPE frequency rescaling
  c.model.rope_scaling.type = "none"  # "none", or "llama3" (Llama 3.1+ checkpoints)
  c.model.rope_scaling.factor = 8.0  # llama3: long wavelengths stretched by this
  c.model.rope_scaling.low_freq_factor = 1.0  # llama3: wavelengths above orig/this are scaled
  c.model.rope_scaling.high_freq_factor = 4.0  # llama3: wavelengths below orig/this are kept
  c.model.rope_scaling.original_max_position_embeddings = 8192  # llama3: the pretraining length
  c.model.dtype = "float32"  # compute dtype (parameters: model.param_dtype)
  c.model.remat_policy = "none"  # one of REMAT_POLICIES: none, full, dots, dots_no_batch, nothing
  c.model.ce_chunk_tokens = 0  # 0: plain CE; else CE over chunks of this many tokens
  c.model.attention_q_chunk = 0  # xla attention: 0 dense; else queries in chunks of this many
  # "auto" picks "cudnn" on a GPU for 16-bit compute with model.head_dim a multiple of 8 up to
  # 128, "splash" on a TPU, else "xla"; "xla" (einsum, any backend); on a GPU with
  # model.dtype="bfloat16": "cudnn" (cuDNN flash attention, packed rows through its segment
  # offsets), "cudnn_mask" (packed rows through a dense mask), "pallas" (Pallas GPU flash kernel
  # with segment ids); on a TPU: "splash" (the Pallas splash kernel)
  c.model.attention_impl = "auto"
  # "default": matmuls in model.dtype; "fp8": the decoder blocks' dense layers in FP8 (e4m3
  # inputs and weights, e5m2 gradients, per-tensor scales from each step's amax; needs
  # model.dtype=bfloat16 and an FP8 GPU). Encoder, mapper, unembed, norms stay in model.dtype.
  c.model.matmul_dtype = "default"
  c.model.param_dtype = "float32"  # parameters (and the Adam moments' source); or "bfloat16"

  c.model.latent = ml_collections.ConfigDict()
  c.model.latent.enabled = True  # False: the plain baseline decoder
  c.model.latent.num_bits = 16  # H; 2^H codes
  c.model.latent.kappa = config_dict.placeholder(float)  # free bits, nats per token
  c.model.latent.kappa_bits = config_dict.placeholder(float)  # the same in bits (set one of the two)
  c.model.latent.inject_layer = config_dict.placeholder(int)  # blocks before the latent; None: L/2
  c.model.latent.post_sampler = "onehot"  # "onehot": 2^H x D table (paper); "bits": H x D map
  c.model.latent.chunk_tokens = 256  # tokens per chunk in the mapper's backward pass
  c.model.latent.add_before_norm = True  # R enters the key/value input before its RMSNorm
  # RoPE in the encoder block's attention. Must stay True: without it the constant queries ζ
  # see the same unmasked keys at every position, so every token gets the same posterior.
  c.model.latent.encoder_rope = True
  c.model.latent.zero_init_post_sampler = True  # at step 0 the FT computes the baseline
  # The KL term: "free_bits" (the paper: mean over tokens of max(0, KL_t - kappa)) or
  # "target_rate" (beta * mean KL, beta adapted every step so that the KL tracks target_bits)
  c.model.latent.kl_control = "free_bits"
  c.model.latent.target_bits = config_dict.placeholder(float)  # target_rate: bits per token
  # target_rate controller (ftjax.train.update_latent_ctl): a PI controller on log(beta), on the
  # relative error (kl_ema - target) / target, started after train.warmup_steps
  c.model.latent.control_ki = 0.02  # integral gain per step
  c.model.latent.control_kp = 0.5  # proportional gain
  c.model.latent.control_ema = 0.9  # smoothing of the measured batch KL (0: none)
  c.model.latent.control_beta_init = 1.0  # beta until the controller starts (1: the ELBO)
  c.model.latent.control_beta_min = 1e-4  # beta is clamped to [min, max]
  c.model.latent.control_beta_max = 100.0  # upper clamp of beta

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # optimizer steps (the cosine schedule's length)
  c.train.batch_size = 32  # sequences per optimizer step (global, over all devices)
  c.train.lr = 1e-3  # peak learning rate
  c.train.warmup_steps = 100  # linear warm-up steps
  c.train.lr_final_fraction = 0.1  # cosine decays to lr * this
  c.train.b1 = 0.9  # AdamW beta1
  c.train.b2 = 0.95  # AdamW beta2
  c.train.weight_decay = 0.1  # AdamW decay of kernels and embeddings
  c.train.grad_clip = 1.0  # global gradient-norm clip (0: off)
  c.train.log_every = 50  # log metrics every this many steps (and step 1 and the last)
  c.train.eval_every = 250  # evaluate every this many steps (and at the end)
  c.train.eval_batches = 4  # batches per evaluation
  c.train.num_samples = 8  # samples printed at the end of a run
  c.train.peak_flops = 0.0  # FLOP/s used for MFU; 0: measure a matmul peak at start-up
  c.train.on_nonfinite = "skip"  # non-finite loss/gradients: "skip" the update, or "stop" the run
  # Microbatches per step: the batch is split into this many inside the jitted step and the
  # gradients summed (float32) before one update; memory scales with batch_size / this.
  c.train.grad_accum_steps = 1
  # where metrics.jsonl's rows, the resolved config and the run name also go: comma-separated
  # TRACKERS, "tensorboard" (RUN/tb) and "wandb" (pip install wandb; RUN/wandb, its run id in
  # RUN/wandb_id.txt so a resumed run continues it; WANDB_MODE, WANDB_ENTITY are wandb's own)
  c.train.trackers = "tensorboard"
  c.train.run_name = ""  # the tracked run's name ("": the workdir's basename)
  c.train.wandb_project = "ftjax"  # wandb project
  # "A:B": a JAX profiler trace of steps A to B (inclusive) in RUN/profile, for TensorBoard's
  # profile plugin / XProf or Perfetto; "": off
  c.train.profile_steps = ""
  # "module:function" called as fn(trainer, state, workdir) at the end of a run, after the
  # end-of-run samples (train.num_samples > 0, one process, not stopped by a signal); the lines it
  # returns are logged and written with the samples. "": none (experiments/synthetic.py sets
  # ftjax.zdiag:shared_z_report)
  c.train.end_of_run = ""

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 0  # save every this many steps (0: only at the end and on SIGTERM)
  c.checkpoint.every_seconds = 0.0  # also save when this much wall-clock time has passed (0: off)
  c.checkpoint.keep = 3  # the newest checkpoints kept
  c.checkpoint.keep_period = 0  # also keep every step that is a multiple of this, for good
  # Verify each checkpoint's checksums (all of its bytes) on restore; a mismatch skips the step
  # for the previous one. False: restore without reading the files twice (faster, unchecked).
  c.checkpoint.verify = True

  c.distributed = ml_collections.ConfigDict()
  # Multi-process runs: a process not heard from for this long counts as lost, and the others
  # stop (exit 1, one line) so that a scheduler can restart the job. jax.distributed's own
  # heartbeat (the backstop, a native abort) gets twice this plus 10 s.
  c.distributed.peer_timeout_seconds = 100

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1  # parameters and optimizer state sharded over this many devices (and the batch)
  c.mesh.tensor = 1  # heads, MLP, vocabulary and codes split over this many devices
  # Error if more of the parameter bytes sit whole on every device (1.0: plain data parallelism
  # allowed; the large configs set 0.05).
  c.mesh.max_replicated_fraction = 1.0

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"  # one of DATASETS (synthetic: the paper's toy task)
  c.data.noise_prob = 1 / 16  # synthetic: probability that a character is replaced by '!'
  c.data.block_len = 8  # synthetic: length of the repeated-letter block
  c.data.eval_fraction = 0.05  # text, loader "memory": share of each document held out
  c.data.loader = "memory"  # text: "memory" (random crops) or "grain" (tfds + grain, packed)
  c.data.data_dir = ""  # grain: prepared datasets ("": $FTJAX_DATA_DIR or ~/.cache/ftjax/datasets)
  c.data.worker_count = 0  # grain: worker processes (the batch order depends on this count)
  # text: "bytes" or "sentencepiece" (trained on the corpus; grain). data.name="prepared": "auto"
  # (the data's own), or "bytes" / a tokenizer file, checked against the data's metadata
  c.data.tokenizer = "bytes"
  c.data.sentencepiece_vocab = 1024  # sentencepiece: vocabulary size (model.vocab_size >= it)
  c.data.path = ""  # data.name="prepared": a directory made by `python -m launch.prepare_data`
  # data.name="prepared": several such directories mixed by weight, "dirA:0.7,dirB:0.3" (instead
  # of data.path; weights are normalised; deterministic and resumable)
  c.data.mixture = ""
  return c


def key_help():
  """[(dotted key, default, comment)] for every key of the schema, comments taken from the
  source of `default_config` (the line's own comment, or the comment lines just above it)."""
  import inspect
  import re
  comments, above = {}, []
  for line in inspect.getsource(default_config).splitlines():
    stripped = line.strip()
    match = re.match(r"c\.([\w.]+) = (.*?)(?:\s+#\s*(.*))?$", stripped)
    if stripped.startswith("#"):
      above.append(stripped.lstrip("# "))
    elif match:
      comments[match.group(1)] = match.group(3) or " ".join(above)
      above = []
    else:
      above = []
  return [(key, value, comments.get(key, ""))
          for key, value in _flat_keys(default_config()).items()]


def config_changes(old, new):
  """["key: old → new"] for each key whose value differs between two resolved configs."""
  a, b = _flat_keys(old), _flat_keys(new)
  return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
          if a.get(k) != b.get(k)]


def _flat_keys(cfg, prefix=""):
  out = {}
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(_flat_keys(v, key + "."))
    else:
      out[key] = v
  return out


def _require(cond, key, message):
  if not cond:
    raise ConfigError(key, message)


def _check_keys(cfg):
  known = _flat_keys(default_config())
  for key in _flat_keys(cfg):
    _require(key in known, key, "unknown key (see ftjax/configs.py for the schema)")


def _check_model(m):
  for key in ("num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim", "vocab_size",
              "seq_len"):
    _require(isinstance(m[key], int) and m[key] > 0, f"model.{key}",
             f"must be a positive integer, got {m[key]!r}")
  _require(m.num_layers % 2 == 0 or not m.latent.enabled or m.latent.inject_layer is not None,
           "model.num_layers", f"must be even for a Free Transformer injecting Z at L/2 (or set "
           f"model.latent.inject_layer), got {m.num_layers}")
  _require(m.d_model % m.num_heads == 0, "model.num_heads",
           f"must divide model.d_model={m.d_model}, got {m.num_heads}")
  _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"must divide model.num_heads={m.num_heads}, got {m.num_kv_heads}")
  _require(m.head_dim >= 0, "model.head_dim", f"must be >= 0 (0: d_model/num_heads), got {m.head_dim}")
  _require(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
  _require(m.remat_policy in REMAT_POLICIES, "model.remat_policy",
           f"must be one of {tuple(REMAT_POLICIES)}, got {m.remat_policy!r}")
  _require(m.ce_chunk_tokens >= 0, "model.ce_chunk_tokens", f"must be >= 0, got {m.ce_chunk_tokens}")
  _require(m.attention_q_chunk >= 0, "model.attention_q_chunk",
           f"must be >= 0, got {m.attention_q_chunk}")
  _require(m.rope_theta > 0, "model.rope_theta", f"must be > 0, got {m.rope_theta}")
  r = m.rope_scaling
  _require(r.type in ("none", "llama3"), "model.rope_scaling.type",
           f"must be 'none' or 'llama3', got {r.type!r}")
  if r.type == "llama3":
    _require(r.factor > 0 and 0 < r.low_freq_factor < r.high_freq_factor, "model.rope_scaling",
             f"llama3 needs factor > 0 and 0 < low_freq_factor < high_freq_factor, got "
             f"{r.factor}, {r.low_freq_factor}, {r.high_freq_factor}")
    _require(r.original_max_position_embeddings > 0,
             "model.rope_scaling.original_max_position_embeddings",
             f"must be > 0, got {r.original_max_position_embeddings}")
  _require(m.param_dtype in DTYPES, "model.param_dtype",
           f"must be one of {DTYPES}, got {m.param_dtype!r}")
  _require(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
           f"must be one of {ATTENTION_IMPLS}, got {m.attention_impl!r}")
  _require(m.matmul_dtype in MATMUL_DTYPES, "model.matmul_dtype",
           f"must be one of {MATMUL_DTYPES}, got {m.matmul_dtype!r}")
  _require(m.matmul_dtype != "fp8" or m.dtype == "bfloat16", "model.matmul_dtype",
           f"fp8 needs model.dtype='bfloat16', got {m.dtype!r}")


def _check_latent(m):
  lat = m.latent
  _require(isinstance(lat.num_bits, int) and 1 <= lat.num_bits <= 24, "model.latent.num_bits",
           f"must be an integer in 1..24, got {lat.num_bits!r}")
  if lat.inject_layer is not None:
    _require(0 <= lat.inject_layer < m.num_layers, "model.latent.inject_layer",
             f"must be in 0..{m.num_layers - 1} (model.num_layers={m.num_layers}), "
             f"got {lat.inject_layer}")
  _require(lat.post_sampler in POST_SAMPLERS, "model.latent.post_sampler",
           f"must be one of {POST_SAMPLERS}, got {lat.post_sampler!r}")
  _require(lat.chunk_tokens > 0, "model.latent.chunk_tokens", f"must be > 0, got {lat.chunk_tokens}")
  _require(lat.encoder_rope, "model.latent.encoder_rope",
           "False makes every position's posterior identical (the constant queries ζ see the "
           "same keys without positions): not supported")
  chunk_bytes = 2 * 4 * lat.chunk_tokens * 2**lat.num_bits
  _require(lat.post_sampler != "onehot" or chunk_bytes <= ONEHOT_CHUNK_BYTES,
           "model.latent.num_bits",
           f"the one-hot post-sampler's backward holds 2 x chunk_tokens x 2^H float32 values "
           f"({chunk_bytes / 2**30:.1f} GiB at H={lat.num_bits}, chunk_tokens="
           f"{lat.chunk_tokens}), above {ONEHOT_CHUNK_BYTES / 2**30:.0f} GiB: lower "
           "model.latent.chunk_tokens or num_bits, or use model.latent.post_sampler=bits")
  _require(lat.kl_control in KL_CONTROLS, "model.latent.kl_control",
           f"must be one of {KL_CONTROLS}, got {lat.kl_control!r}")
  _require(lat.control_ki >= 0 and lat.control_kp >= 0, "model.latent.control_ki",
           f"control_ki and control_kp must be >= 0, got {lat.control_ki}, {lat.control_kp}")
  _require(0 <= lat.control_ema < 1, "model.latent.control_ema",
           f"must be in [0, 1), got {lat.control_ema}")
  _require(0 < lat.control_beta_min <= lat.control_beta_init <= lat.control_beta_max,
           "model.latent.control_beta_init", "need 0 < control_beta_min <= control_beta_init <= "
           f"control_beta_max, got {lat.control_beta_min}, {lat.control_beta_init}, "
           f"{lat.control_beta_max}")
  if not lat.enabled:
    return
  if lat.kl_control == "target_rate":
    _require(lat.target_bits is not None and lat.target_bits > 0, "model.latent.target_bits",
             f"kl_control=target_rate needs target_bits > 0, got {lat.target_bits}")
    _require(lat.kappa is None or lat.kappa_bits is None, "model.latent.kappa",
             "set at most one of model.latent.kappa and model.latent.kappa_bits")
    return
  _require((lat.kappa is None) != (lat.kappa_bits is None), "model.latent.kappa",
           "set exactly one of model.latent.kappa (nats) and model.latent.kappa_bits (bits), got "
           f"kappa={lat.kappa}, kappa_bits={lat.kappa_bits}")
  kappa = lat.kappa if lat.kappa is not None else lat.kappa_bits
  key = "model.latent.kappa" if lat.kappa is not None else "model.latent.kappa_bits"
  _require(kappa >= 0, key, f"must be >= 0, got {kappa}")


def _check_train(t):
  for key in ("steps", "batch_size", "log_every", "eval_every", "eval_batches"):
    _require(isinstance(t[key], int) and t[key] > 0, f"train.{key}",
             f"must be a positive integer, got {t[key]!r}")
  _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
  _require(0 <= t.warmup_steps <= t.steps, "train.warmup_steps",
           f"must be in 0..train.steps={t.steps}, got {t.warmup_steps}")
  _require(0 <= t.lr_final_fraction <= 1, "train.lr_final_fraction",
           f"must be in [0, 1], got {t.lr_final_fraction}")
  _require(0 <= t.b1 < 1 and 0 <= t.b2 < 1, "train.b1", f"b1, b2 must be in [0, 1), got {t.b1}, {t.b2}")
  _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
  _require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0: off), got {t.grad_clip}")
  _require(t.num_samples >= 0, "train.num_samples", f"must be >= 0, got {t.num_samples}")
  _require(t.on_nonfinite in ("skip", "stop"), "train.on_nonfinite",
           f"must be 'skip' or 'stop', got {t.on_nonfinite!r}")
  _require(isinstance(t.grad_accum_steps, int) and t.grad_accum_steps >= 1,
           "train.grad_accum_steps", f"must be a positive integer, got {t.grad_accum_steps!r}")
  _require(t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
           f"must divide train.batch_size={t.batch_size}, got {t.grad_accum_steps}")
  names = tracker_names(t)
  _require(set(names) <= set(TRACKERS) and len(set(names)) == len(names), "train.trackers",
           f"must be comma-separated names from {TRACKERS}, each at most once, got {t.trackers!r}")
  profile_steps(t)  # or ConfigError
  _require(not t.end_of_run or re.fullmatch(r"[\w.]+:\w+", str(t.end_of_run)), "train.end_of_run",
           f"must be 'module:function' or '', got {t.end_of_run!r}")


def tracker_names(t):
  """The names in train.trackers, in order ("" gives none: metrics.jsonl only)."""
  return [name.strip() for name in t.trackers.split(",") if name.strip()]


def profile_steps(t):
  """(first, last) steps of train.profile_steps, None when it is ""; ConfigError when it is not
  "A:B" with 1 <= A <= B <= train.steps."""
  if not t.profile_steps:
    return None
  match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(t.profile_steps))
  _require(match and 1 <= int(match[1]) <= int(match[2]) <= t.steps, "train.profile_steps",
           f"must be 'A:B' with 1 <= A <= B <= train.steps={t.steps}, got {t.profile_steps!r}")
  return int(match[1]), int(match[2])


def end_of_run_hook(t):
  """The function train.end_of_run names (None when it is ""); ConfigError when it cannot be
  imported."""
  if not t.end_of_run:
    return None
  module, _, name = t.end_of_run.partition(":")
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ConfigError("train.end_of_run", f"cannot import {t.end_of_run!r} ({e})") from None


def _check_checkpoint(c):
  _require(c.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {c.every_steps}")
  _require(c.every_seconds >= 0, "checkpoint.every_seconds", f"must be >= 0, got {c.every_seconds}")
  _require(c.keep >= 1, "checkpoint.keep", f"must be >= 1, got {c.keep}")
  _require(c.keep_period >= 0, "checkpoint.keep_period", f"must be >= 0, got {c.keep_period}")
  _require(isinstance(c.verify, bool), "checkpoint.verify",
           f"must be True or False, got {c.verify!r}")


def _check_distributed(d):
  _require(isinstance(d.peer_timeout_seconds, int) and d.peer_timeout_seconds >= 1,
           "distributed.peer_timeout_seconds",
           f"must be a whole number of seconds >= 1, got {d.peer_timeout_seconds!r}")


def _check_mesh(mesh):
  for key in ("data", "fsdp", "tensor"):
    _require(mesh[key] == -1 or mesh[key] >= 1, f"mesh.{key}", f"must be -1 or >= 1, got {mesh[key]}")
  _require([mesh.data, mesh.fsdp, mesh.tensor].count(-1) <= 1, "mesh",
           "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
  _require(0 <= mesh.max_replicated_fraction <= 1, "mesh.max_replicated_fraction",
           f"must be in [0, 1], got {mesh.max_replicated_fraction}")


def _check_data(cfg):
  d = cfg.data
  _require(d.name in DATASETS, "data.name", f"must be one of {DATASETS}, got {d.name!r}")
  _require(0 <= d.noise_prob < 1, "data.noise_prob", f"must be in [0, 1), got {d.noise_prob}")
  _require(0 < d.eval_fraction < 1, "data.eval_fraction", f"must be in (0, 1), got {d.eval_fraction}")
  _require(d.loader in LOADERS, "data.loader", f"must be one of {LOADERS}, got {d.loader!r}")
  _require(d.worker_count >= 0, "data.worker_count", f"must be >= 0, got {d.worker_count}")
  _require(d.loader == "grain" or d.name != "python_stdlib", "data.loader",
           "data.name='python_stdlib' is read with data.loader='grain'")
  _require(not (d.path and d.mixture), "data.mixture", "set data.path or data.mixture, not both")
  for key, path in [("data.data_dir", d.data_dir), ("data.tokenizer", d.tokenizer)]:
    _require(not url_error(path), key, url_error(path))
  prepared = [("data.path", d.path)]  # local, gs:// or s3://
  if d.mixture:
    prepared += [("data.mixture", path) for path, _ in parse_mixture(d.mixture)]  # or ConfigError
  for key, path in prepared:
    _require(not storage.unsupported(path), key, storage.unsupported(path))
  if d.name == "prepared":  # the data itself is checked when the source is made (dry runs
    return  # need none): its tokenizer against data.tokenizer, its vocabulary against the model
  _require(not d.path and not d.mixture, "data.path",
           "data.path and data.mixture are for data.name='prepared'")
  _require(d.tokenizer in ("bytes", "sentencepiece"), "data.tokenizer",
           f"must be 'bytes' or 'sentencepiece', got {d.tokenizer!r}")
  _require(d.tokenizer == "bytes" or d.loader == "grain", "data.tokenizer",
           "sentencepiece needs data.loader='grain'")
  if d.name == "synthetic":
    need = synthetic.sequence_length(cfg) - 1
    _require(cfg.model.seq_len == need, "model.seq_len",
             f"the synthetic task needs seq_len={need} (data.block_len={d.block_len}), "
             f"got {cfg.model.seq_len}")
    _require(0 < d.block_len <= synthetic.BODY_LEN, "data.block_len",
             f"must be in 1..{synthetic.BODY_LEN}, got {d.block_len}")
    vocab = synthetic.VOCAB_SIZE
  elif d.tokenizer == "sentencepiece":
    _require(d.sentencepiece_vocab >= 512, "data.sentencepiece_vocab",
             f"must be >= 512 (256 byte-fallback pieces + the corpus's characters), "
             f"got {d.sentencepiece_vocab}")
    vocab = d.sentencepiece_vocab
  else:
    vocab = text.VOCAB_SIZE
  _require(cfg.model.vocab_size >= vocab, "model.vocab_size",
           f"data.name={d.name!r} needs at least {vocab}, got {cfg.model.vocab_size}")


def with_overrides(cfg, overrides):
  """A copy of `cfg` with {dotted key: value} overrides applied (not validated: see `resolve`)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.unlock()
  for key, value in overrides.items():
    node = cfg
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return cfg


def resolve(cfg):
  """Validates `cfg` and returns a locked copy with derived fields filled in.

  Derived: `model.head_dim` (when 0), `model.latent.inject_layer` (when None: L/2) and
  `model.latent.kappa` in nats (from `kappa_bits` when that is the one given).
  """
  _check_keys(cfg)
  cfg = ml_collections.ConfigDict(cfg.to_dict())  # an unlocked copy; placeholders become values
  _check_model(cfg.model)
  _check_latent(cfg.model)
  _check_train(cfg.train)
  _check_checkpoint(cfg.checkpoint)
  _check_distributed(cfg.distributed)
  _check_mesh(cfg.mesh)
  _check_data(cfg)
  m = cfg.model
  if m.head_dim == 0:
    m.head_dim = m.d_model // m.num_heads
  lat = m.latent
  if lat.inject_layer is None:
    lat.inject_layer = m.num_layers // 2
  if lat.kappa is None:  # resolved configs carry kappa in nats only, so resolve() is idempotent
    lat.kappa = 0.0 if lat.kappa_bits is None else bits_to_nats(lat.kappa_bits)
    lat.kappa_bits = None
  cfg.lock()
  return cfg


def bits_to_nats(bits):
  return bits * math.log(2)
