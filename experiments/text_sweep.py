"""Baseline vs Free Transformer on real text, at a budget that trains on a 2-core CPU.

  python -m launch.sweep --config=experiments/text_sweep.py --workdir=runs/text [--only=seed=0,]
  python -m experiments.text_results --root=runs/text --out=experiments/results/text

Every point of a seed sees the same batches in the same order (the data stream depends only on
data.* and the seed) for the same number of steps; three seeds give the paired differences their
spread (experiments/text_results.py). Per corpus: the baseline, the baseline with one more
block (the FT's encoder block costs about one block: the compute/parameter-matched control), and
the FT at two κ values; on Shakespeare also the factored per-bit post-sampler. H = 12 rather than
the paper's 16: at D = 128 the 2^16-row table's backward would cost ~3× the rest of the model.
Compare on eval_ce (uniform Z) and eval_elbo (≥ the FT's NLL), never on CE with encoder Z.
"""

from ftjax.configs import default_config

CORPORA = ("shakespeare", "python_stdlib")
KAPPA_BITS = (0.25, 1.0)
SEEDS = (0, 1, 2)  # each seed: its own initialisation, data order and Z draws, shared by its points


def get_config():
  c = default_config()
  c.data.name = "shakespeare"
  c.data.loader = "grain"
  c.model.num_layers = 4
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 384
  c.model.vocab_size = 264  # bytes
  c.model.seq_len = 128
  c.model.latent.num_bits = 12
  c.model.latent.kappa_bits = 0.25
  c.train.steps = 400
  c.train.batch_size = 32
  c.train.lr = 2e-3
  c.train.warmup_steps = 40
  c.train.log_every = 50
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.num_samples = 2
  return c


def get_sweep():
  points = []
  for seed in SEEDS:
    for corpus in CORPORA:
      points += [{"seed": seed, "data.name": corpus, "model.latent.enabled": False},
                 {"seed": seed, "data.name": corpus, "model.latent.enabled": False,
                  "model.num_layers": 5}]
      points += [{"seed": seed, "data.name": corpus, "model.latent.kappa_bits": k}
                 for k in KAPPA_BITS]
    points.append({"seed": seed, "data.name": "shakespeare", "model.latent.kappa_bits": 1.0,
                   "model.latent.post_sampler": "bits"})
  return points
