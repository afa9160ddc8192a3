"""What Z encodes on the synthetic task: fixed-Z renders and agreement statistics per run.

  python -m experiments.synthetic_study --root=runs/synthetic_sweep \
      --out=experiments/results/synthetic [--num_z=6] [--per_z=8] [--seed=0]

For every run under --root (sub-directories with a checkpoint), samples `num_z` blocks of `per_z`
sequences, each block with one fixed Z (one draw of a code per position from the uniform prior,
shared by the block) and a random prompt letter per sequence, renders them as the paper does (one
figure per run, one block per Z; '_' blank, '!' red, letters blue) and measures, over pairs of
samples that share a Z and over pairs that do not:
  - position: both blocks start at the same place;
  - letter: both bodies use the same letter (prompts differ, so a Z that ignores the letter gives
    ~1/26);
  - noise: Jaccard overlap of the '!' positions.
Also: how often the body's letter is the prompt's, and the share of well-formed samples with fixed
Z and with Z uniform per token (how generation works). Writes <run>.png, <run>.txt, stats.json
and stats.md under --out.
"""

import argparse
import itertools
import json
import os

import numpy as np

from ftjax import zdiag
from ftjax.data import synthetic


def body_stats(text):
  """(letter or None, block start or None, set of '!' positions) of a decoded 'X>body'."""
  body = text[2:]
  letters = [i for i, c in enumerate(body) if c.isalpha()]
  if not letters:
    return None, None, {i for i, c in enumerate(body) if c == "!"}
  counts = {}
  for i in letters:
    counts[body[i]] = counts.get(body[i], 0) + 1
  letter = max(counts, key=counts.get)
  return letter, min(i for i in letters if body[i] == letter), {i for i, c in enumerate(body)
                                                                  if c == "!"}


def pair_rates(groups):
  """Agreement rates over pairs within a group and across groups: {name: (same, different)}."""
  def rates(pairs):
    pairs = list(pairs)
    pos = [a[1] is not None and a[1] == b[1] for a, b in pairs]
    let = [a[0] is not None and a[0] == b[0] for a, b in pairs]
    noise = [len(a[2] & b[2]) / max(len(a[2] | b[2]), 1) for a, b in pairs]
    return {"position": float(np.mean(pos)), "letter": float(np.mean(let)),
            "noise_jaccard": float(np.mean(noise))}
  same = rates(p for g in groups for p in itertools.combinations(g, 2))
  diff = rates((a, b) for g, h in itertools.combinations(groups, 2) for a in g for b in h)
  return {k: (same[k], diff[k]) for k in same}


def strict_stats(texts, block_len=8, noise_prob=1 / 16, seed=0, draws=10000):
  """Checks stricter than `well_formed`, on decoded 'X>body' samples:
  - `in_block_bang`: share of '!' among the `block_len` characters from the block's first letter
    (the data: `noise_prob`);
  - `block_letters_mean`: mean count of the prompt's letter in the body (the data: block_len ×
    (1 − noise_prob) = 7.5);
  - `strict_well_formed`: well-formed and at least block_len − 2 letters in the block;
  - start positions (the data: uniform over 0..64 − block_len): min, max, mean, and
    `start_uniform_p`, a Monte-Carlo p-value of the Kolmogorov–Smirnov distance to the uniform
    (`draws` uniform samples of the same size; small p: not uniform)."""
  body_len = synthetic.BODY_LEN
  bangs, letters, starts, strict = [], [], [], []
  ok = synthetic.well_formed(texts, block_len)
  for t, good in zip(texts, ok):
    body, letter = t[2:], t[0]
    idx = [i for i, c in enumerate(body) if c == letter]
    letters.append(len(idx))
    if not idx:
      strict.append(False)
      continue
    region = body[idx[0]:idx[0] + block_len]
    bangs.append(region.count("!") / block_len)
    starts.append(idx[0])
    strict.append(bool(good) and region.count(letter) >= block_len - 2)
  out = {"n": len(texts), "in_block_bang": float(np.mean(bangs)) if bangs else None,
         "block_letters_mean": float(np.mean(letters)) if letters else None,
         "strict_well_formed": float(np.mean(strict)) if strict else None,
         "data_in_block_bang": noise_prob, "data_block_letters_mean": block_len * (1 - noise_prob)}
  if starts:
    positions = body_len - block_len + 1
    grid = np.arange(positions)

    def ks(sample):
      cdf = np.searchsorted(np.sort(sample), grid, side="right") / len(sample)
      return np.max(np.abs(cdf - (grid + 1) / positions))
    rng = np.random.default_rng(seed)
    observed = ks(np.asarray(starts))
    null = np.array([ks(rng.integers(0, positions, len(starts))) for _ in range(draws)])
    out.update(start_min=int(min(starts)), start_max=int(max(starts)),
               start_mean=float(np.mean(starts)), data_start_mean=(positions - 1) / 2,
               start_ks=float(observed),
               start_uniform_p=float((1 + np.sum(null >= observed)) / (1 + draws)))
  return out


def permutation_test(texts, groups, seed=0, draws=10000):
  """For each agreement statistic of `pair_rates` (position, letter, noise overlap): the observed
  rate over pairs sharing a Z minus over pairs with different Z, and a one-sided permutation
  p-value over the Z-group labels (`zdiag.group_permutation_test`; small p: samples that share a
  Z agree more than chance, i.e. Z encodes that property)."""
  parsed = [body_stats(t) for t in texts]
  tests = zdiag.group_permutation_test(
      {"position": [[a[1] is not None and a[1] == b[1] for b in parsed] for a in parsed],
       "letter": [[a[0] is not None and a[0] == b[0] for b in parsed] for a in parsed],
       "noise_jaccard": [[len(a[2] & b[2]) / max(len(a[2] | b[2]), 1) for b in parsed]
                         for a in parsed]},
      groups, draws, seed)
  return {name: {"same_minus_other": within - across, "p_value": p}
          for name, (within, across, p) in tests.items()}


def read_render(path):
  """(texts, group labels) from a <run>.txt written by this script ('Z #k' blocks)."""
  texts, groups, k = [], [], -1
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.rstrip("\n")
      if line.startswith("Z #"):
        k = int(line[3:])
      elif line:
        texts.append(line)
        groups.append(k)
  return texts, groups


def sample(trainer, state, letters, key, z_mode, codes_BT=None):
  import jax
  import jax.numpy as jnp

  from ftjax import sampling
  from ftjax.model import make_model
  cfg = trainer.cfg
  prompts = np.stack([synthetic.encode(f"{chr(ord('A') + l)}>") for l in letters])
  out = sampling.generate(
      make_model(cfg.model, decode=True), state.params, jnp.asarray(prompts),
      jnp.zeros(len(letters), jnp.int32), key, max_new_tokens=synthetic.BODY_LEN, z_mode=z_mode,
      fixed_codes_BT=None if codes_BT is None else jnp.asarray(codes_BT, jnp.int32))
  return [synthetic.decode(row) for row in np.asarray(jax.device_get(out["tokens"]))]


def render(blocks, title, path):
  """One figure: a block of rows per Z; '_' blank, '!' red, letters blue."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = sum(len(b) + 1 for b in blocks)
  fig, ax = plt.subplots(figsize=(11, 0.17 * rows + 0.8))
  y = 0
  for k, block in enumerate(blocks):
    ax.text(-1.5, y + len(block) / 2, f"Z #{k}", ha="right", va="center", fontsize=7)
    for text in block:
      for x, c in enumerate(text):
        if c != "_":
          color = "tab:red" if c == "!" else ("tab:blue" if x > 1 else "black")
          ax.text(x, y, c, ha="center", va="center", fontsize=6.5, family="monospace",
                  color=color)
        else:
          ax.plot([x - 0.3, x + 0.3], [y + 0.3] * 2, color="0.75", lw=0.6)
      y += 1
    y += 1
  ax.set_xlim(-8, len(blocks[0][0]) + 1)
  ax.set_ylim(y, -1)
  ax.axis("off")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def study(workdir, num_z, per_z, seed):
  from ftjax.trainer import load_run
  trainer, state = load_run(workdir)
  return study_state(trainer, state, os.path.basename(workdir), num_z, per_z, seed)


def write_zstudy(trainer, state, workdir, num_z=8, per_z=8, seed=0):
  """Samples of a trained run, written to `workdir`/zstudy.json: the `study_state` statistics plus
  the raw texts (fixed Z: `fixed_texts` with `fixed_groups`, the Z draw of each; Z uniform:
  `uniform_texts`), so that permutation tests can be computed later without the checkpoint."""
  result, blocks = study_state(trainer, state, os.path.basename(workdir), num_z, per_z, seed,
                               keep_texts=True)
  with open(os.path.join(workdir, "zstudy.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  return result


def study_state(trainer, state, name, num_z, per_z, seed, keep_texts=False):
  import jax

  lat = trainer.cfg.model.latent
  rng = np.random.default_rng(seed)
  n = num_z * per_z
  letters = rng.integers(0, 26, n)
  result = {"run": name, "latent": bool(lat.enabled), "step": int(state.step)}
  uniform = sample(trainer, state, letters, jax.random.key(seed), "uniform")
  result["well_formed_uniform"] = float(np.mean(synthetic.well_formed(uniform)))
  if keep_texts:
    result["uniform_texts"] = uniform
  if not lat.enabled:
    return result, None
  result.update(num_bits=lat.num_bits, kappa_bits=lat.kappa / np.log(2),
                post_sampler=lat.post_sampler)
  length = synthetic.PROMPT_LEN + synthetic.BODY_LEN
  codes_ZT = rng.integers(0, 2**lat.num_bits, (num_z, length))
  texts = sample(trainer, state, letters, jax.random.key(seed + 1), "fixed",
                 np.repeat(codes_ZT, per_z, axis=0))
  blocks = [texts[i * per_z:(i + 1) * per_z] for i in range(num_z)]
  parsed = [[body_stats(t) for t in b] for b in blocks]
  result["agreement_same_vs_different_z"] = pair_rates(parsed)
  result["letter_follows_prompt"] = float(np.mean(
      [p[0] == t[0] for b, pb in zip(blocks, parsed) for t, p in zip(b, pb)]))
  result["well_formed_fixed"] = float(np.mean(synthetic.well_formed(texts)))
  if keep_texts:
    result["fixed_texts"] = texts
    result["fixed_groups"] = [i // per_z for i in range(len(texts))]
  return result, blocks


def has_checkpoint(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def table(results):
  head = ["run", "H", "κ (bits)", "well-formed, Z uniform", "well-formed, Z fixed",
          "same position (same Z / other Z)", "same letter (same Z / other Z)",
          "noise overlap (same Z / other Z)", "letter = prompt's"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    if not r["latent"]:
      lines.append(f"| {r['run']} | – | – | {r['well_formed_uniform']:.2f} | – | – | – | – | – |")
      continue
    a = r["agreement_same_vs_different_z"]
    pair = lambda k: f"{a[k][0]:.2f} / {a[k][1]:.2f}"
    lines.append(f"| {r['run']} | {r['num_bits']} | {r['kappa_bits']:.4g} | "
                 f"{r['well_formed_uniform']:.2f} | {r['well_formed_fixed']:.2f} | "
                 f"{pair('position')} | {pair('letter')} | {pair('noise_jaccard')} | "
                 f"{r['letter_follows_prompt']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_z", type=int, default=6)
  parser.add_argument("--per_z", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--only", default="", help="Substring of the run names to study.")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  runs = sorted(d for d in os.listdir(args.root) if args.only in d and has_checkpoint(
      os.path.join(args.root, d)))
  if not runs:
    raise SystemExit(f"synthetic_study: no run with checkpoints under {args.root}")
  results = []
  for name in runs:
    result, renders = study(os.path.join(args.root, name), args.num_z, args.per_z, args.seed)
    results.append(result)
    if renders:
      title = (f"{name}: {args.num_z} draws of Z (a code per position), {args.per_z} samples each "
               "(prompt letter random)")
      render(renders, title, os.path.join(args.out, f"{name}.png"))
      with open(os.path.join(args.out, f"{name}.txt"), "w", encoding="utf-8") as f:
        for k, block in enumerate(renders):
          f.write(f"Z #{k}\n" + "\n".join(block) + "\n\n")
    print(json.dumps(result), flush=True)
  with open(os.path.join(args.out, "stats.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(args.out, "stats.md"), "w", encoding="utf-8") as f:
    f.write(table(results))
  print(table(results))


if __name__ == "__main__":
  main()
