"""The κ study: per-bit and one-hot post-samplers, H = 16, κ ∈ {1/16, 1/4, 1, 4} bits,
3 seeds, 3000 steps, and the baseline with the same 3 seeds; then the target-rate controller at
1/16, 1/4 and 1 bit (3 seeds each). Run through launch.sweep, so it resumes after interruptions:

  python -m launch.sweep --config=experiments/kappa_study.py --workdir=runs/kappa_study --in_process
  python -m experiments.kappa_results --root=runs/kappa_study --out=experiments/results/kappa_study

Points are ordered so that those differing only in κ (or the target) are consecutive: with
--in_process they share one compilation. `after_point` samples each finished FT with shared Z
draws (experiments.synthetic_study.write_zstudy: <run>/zstudy.json), which kappa_results turns into
permutation tests. experiments/run_kappa_study_gpu.py runs it as concurrent workers on one GPU.
"""

from experiments import synthetic

KAPPA_BITS = (1 / 16, 1 / 4, 1, 4)
TARGET_BITS = (1 / 16, 1 / 4, 1)
SEEDS = (0, 1, 2)
POST_SAMPLERS = ("bits", "onehot")


def get_config():
  c = synthetic.get_config()
  c.train.steps = 3000
  c.train.warmup_steps = 100
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.num_samples = 0  # after_point samples instead
  c.checkpoint.every_seconds = 60.0  # resumable mid-point
  return c


def get_sweep():
  points = []
  for seed in SEEDS:
    for ps in POST_SAMPLERS:
      points += [{"seed": seed, "model.latent.post_sampler": ps, "model.latent.kappa_bits": k}
                 for k in KAPPA_BITS]
  points += [{"seed": seed, "model.latent.enabled": False} for seed in SEEDS]
  for seed in SEEDS:
    # β starts at 0.01, not 1: with β = 1 during the warm-up the KL collapses to ≈ 0 and stays
    # there (experiments/controller_check.py, 300 steps), so the decoder has nothing to learn to read
    points += [{"seed": seed, "model.latent.post_sampler": "bits",
                "model.latent.kl_control": "target_rate", "model.latent.target_bits": t,
                "model.latent.control_beta_init": 0.01}
               for t in TARGET_BITS]
  return points


def after_point(trainer, state, workdir):
  from experiments import synthetic_study
  synthetic_study.write_zstudy(trainer, state, workdir)
