"""Experiment files and scripts: every sweep point resolves; plots and Z statistics are right."""

import csv
import json
import math
import os

import numpy as np
import pytest

from experiments import plot, synthetic_study, synthetic_sweep, text_sweep
from ftjax.configs import resolve, with_overrides


@pytest.mark.parametrize("sweep", [synthetic_sweep, text_sweep])
def test_every_sweep_point_resolves(sweep):
  for point in sweep.get_sweep():
    resolve(with_overrides(sweep.get_config(), point))


def test_body_stats_and_pair_rates():
  body = "_" * 10 + "!" + "B" * 8 + "_" * 45
  letter, start, noise = synthetic_study.body_stats("B>" + body)
  assert (letter, start, noise) == ("B", 11, {10})
  same_pos = [("B", 3, {1}), ("C", 3, {1})]
  other = [("D", 9, {2}), ("D", 9, set())]
  rates = synthetic_study.pair_rates([same_pos, other])
  assert rates["position"] == (1.0, 0.0)
  assert rates["letter"] == (0.5, 0.0)  # the second group shares its letter, the first does not
  assert rates["noise_jaccard"][0] == pytest.approx(0.5)  # {1}&{1} = 1, {2}&{} = 0


def _fake_run(root, name, latent, kappa_bits, values):
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"model": {"latent": {"enabled": latent, "kappa_bits": None, "num_bits": 16,
                                    "kappa": kappa_bits and kappa_bits * math.log(2)}}}, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step, v in values:
      f.write(json.dumps({"step": step, "eval_ce": v, "eval_kl": v / 10}) + "\n")
    f.write('{"step": 3, "eval_')  # a torn last line is skipped
  return workdir


def test_plots_from_metrics_files(tmp_path):
  runs = [_fake_run(tmp_path, "base", False, None, [(1, 1.0), (2, 0.5)]),
          _fake_run(tmp_path, "k1", True, 1.0, [(1, 1.2), (2, 0.6)]),
          _fake_run(tmp_path, "k4", True, 4.0, [(1, 1.3), (2, 0.7)])]
  series = plot.read_metrics(runs[1])
  assert series["eval_ce"] == [(1, 1.2), (2, 0.6)]
  assert series["eval_kl_bits"][-1][1] == pytest.approx(0.06 / math.log(2))
  assert [p[1:] for p in plot.sweep_points(str(tmp_path), "kappa_bits", "num_bits")] == [
      (None, None), (pytest.approx(1.0), "num_bits=16"), (pytest.approx(4.0), "num_bits=16")]
  plot.main(["curves", "--runs", *runs, "--metrics=eval_ce", f"--out={tmp_path}/c.png"])
  plot.main(["sweep", f"--root={tmp_path}", "--metrics=eval_ce,eval_kl_bits",
             f"--out={tmp_path}/s.png"])
  assert os.path.getsize(tmp_path / "c.png") > 0 and os.path.getsize(tmp_path / "s.png") > 0
  with pytest.raises(SystemExit, match="no metric 'nope'"):
    plot.main(["sweep", f"--root={tmp_path}", "--metrics=nope", f"--out={tmp_path}/x.png"])


def test_shared_z_tests_against_hand_counts_and_chance():
  from ftjax import zdiag
  # Two groups: group 0 shares a block start (4) and a '!' at 20; group 1 shares neither.
  texts = ["A>____AAAAAAAA" + "_" * 6 + "!" + "_" * 43,
           "B>____BBBBBBBB" + "_" * 6 + "!" + "_" * 43,
           "C>____CCCCCCCC" + "_" * 6 + "!" + "_" * 43,
           "D>_DDDDDDDD" + "_" * 55,
           "E>" + "_" * 30 + "EEEEEEEE" + "_" * 26,
           "F>" + "!" + "_" * 63]
  out = zdiag.shared_z_tests(texts, [0, 0, 0, 1, 1, 1], draws=2000)
  within, across, p = out["position"]
  assert within == pytest.approx(3 / 6) and across == 0.0
  # 20 relabellings of 6 samples into two triples; 2 of them put the three start-4 samples together
  assert p == pytest.approx(2 / 20, abs=0.03)
  within, across, p = out["noise"]
  assert within == pytest.approx(3 / 6) and across == 0.0
  assert p == pytest.approx(2 / 20, abs=0.03)
  # Starts 4, 4, 4 | 1, 30, none: the sample without a block is left out of the distances.
  within, across, p = out["distance"]
  assert within == pytest.approx((0 + 0 + 0 + 29) / 4)
  assert across == pytest.approx((3 + 26) * 3 / 6)
  # Relabellings as small a within-group distance: the observed one and its mirror image.
  assert p == pytest.approx(2 / 20, abs=0.03)
  # A sample without its letter's block agrees with no other on position.
  no_block = zdiag.shared_z_tests(["A>" + "_" * 64] * 4, [0, 0, 1, 1], draws=10)
  assert no_block["position"][:2] == (0, 0)
  # ... and has no distance to any: no evidence either way.
  assert no_block["distance"][2] == 1.0 and math.isnan(no_block["distance"][0])


def test_shared_z_chance_levels_follow_the_block_length():
  from ftjax import zdiag
  from ftjax.data import synthetic
  texts, groups = ["A>" + "_" * 64] * 4, [0, 0, 1, 1]
  tests = zdiag.shared_z_tests(texts, groups, draws=10)
  for block_len, printed in ((8, ("0.02", "19")), (32, ("0.03", "11"))):
    # The starts the data draws from: two independent ones coincide and lie apart on average.
    starts = np.arange(synthetic.BODY_LEN - block_len + 1)
    exact = (1 / len(starts), np.abs(starts[:, None] - starts[None, :]).mean())
    assert zdiag.block_start_chance(block_len) == pytest.approx(exact)
    lines = zdiag.shared_z_lines(texts, groups, tests, block_len)
    assert f"(chance ≈ {printed[0]})" in lines[-3] and f"(chance ≈ {printed[1]})" in lines[-2]


def test_kappa_results_groups_earlier_runs_with_their_device(tmp_path):
  """--also: the matching runs of an earlier results.json join the groups, each row naming the
  device that ran it."""
  from experiments import kappa_results
  run = {"enabled": True, "post_sampler": "onehot", "kl_control": "free_bits", "kappa_bits": 1.0,
         "eval_ce": 0.35}
  earlier = {"device": "GPU", "runs": [
      {**run, "run": "seed=0,post_sampler=onehot,kappa_bits=1", "seed": 0},
      {**run, "run": "seed=0,post_sampler=bits,kappa_bits=1", "seed": 0, "post_sampler": "bits"}]}
  path = tmp_path / "results.json"
  path.write_text(json.dumps(earlier))
  runs = kappa_results.earlier_runs(str(path), "post_sampler=onehot")
  assert [(r["run"], r["device"]) for r in runs] == [("seed=0,post_sampler=onehot,kappa_bits=1",
                                                      "GPU")]
  mine = {**run, "run": "seed=1,post_sampler=onehot,kappa_bits=1", "seed": 1, "eval_ce": 0.37,
          "device": "CPU"}
  (group,) = kappa_results.groups(runs + [mine])
  assert group["seeds"] == "0,1" and group["eval_ce_n"] == 2
  assert math.isclose(group["eval_ce_mean"], 0.36)


def test_main_job_power_summary_counts_passes_per_design():
  from experiments import main_job_power
  rows = [{"run": "a", "num_z": 8, "per_z": 6, "sampling_wall_s": 1.0, "position_p": p,
           "distance_p": d, "noise_p": q}
          for p, d, q in ((0.01, 0.01, 0.5), (0.3, 0.02, 0.02), (0.5, 0.6, 0.6))]
  rows.append({"run": "a", "num_z": 16, "per_z": 8, "sampling_wall_s": 3.0, "position_p": 0.0001,
               "distance_p": 0.0001, "noise_p": 0.0001})
  small, large = main_job_power.summarize(rows)
  # 0.02 is above 0.05 / 3: the three tests share 0.05.
  assert (small["samples"], small["sets"], small["position_passes"], small["distance_passes"],
          small["noise_passes"], small["any_passes"]) == (48, 3, 1, 1, 0, 1)
  assert small["position_p_median"] == 0.3 and small["distance_p_median"] == 0.02
  assert (large["samples"], large["any_passes"]) == (128, 1)


def test_text_results_pairs_each_seed_with_its_baselines(tmp_path):
  from experiments import text_results
  def run(name, seed, bpb, layers=4, kappa=None, steps=400, reached=400):
    d = tmp_path / name
    d.mkdir()
    latent = {"enabled": kappa is not None, "kappa": (kappa or 0) * math.log(2),
              "post_sampler": "onehot"}
    (d / "config.json").write_text(json.dumps({
        "seed": seed, "data": {"name": "shakespeare"}, "train": {"steps": steps},
        "model": {"num_layers": layers, "latent": latent}}))
    row = {"step": reached, "eval_ce": bpb, "eval_bpb": bpb, "eval_elbo_bpb": bpb + 0.1}
    if kappa is not None:
      row.update(eval_kl=0.1, eval_z_use=0.0)
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n" +
                                     json.dumps(row) + "\n")
  for seed, (base, ft) in enumerate(((2.0, 1.9), (2.2, 2.2), (2.1, 2.0))):
    run(f"b{seed}", seed, base)
    run(f"c{seed}", seed, base - 0.05, layers=5)
    run(f"f{seed}", seed, ft, kappa=1)
  run("f3", 3, 1.0, kappa=1, reached=100)  # unfinished: listed, not grouped
  text_results.main([f"--root={tmp_path}", f"--out={tmp_path}/out", "--device=CPU"])
  with open(tmp_path / "out" / "groups.csv", encoding="utf-8") as f:
    rows = {r["model"]: r for r in csv.DictReader(f)}
  ft = rows["FT, kappa=1 bits, onehot"]
  assert ft["seeds"] == "0,1,2"
  assert float(ft["eval_bpb_minus_baseline_mean"]) == pytest.approx(-0.2 / 3)
  assert float(ft["eval_bpb_minus_baseline_std"]) == pytest.approx(0.0577, abs=1e-4)
  assert float(ft["eval_bpb_minus_control_mean"]) == pytest.approx(-0.2 / 3 + 0.05)
  assert rows["baseline + 1 block"]["eval_bpb_minus_control_mean"] == ""
  assert float(rows["baseline + 1 block"]["eval_bpb_minus_baseline_mean"]) == pytest.approx(-0.05)
  with open(tmp_path / "out" / "runs.csv", encoding="utf-8") as f:
    assert sum(r["finished"] == "False" for r in csv.DictReader(f)) == 1
  with open(tmp_path / "out" / "curves.csv", encoding="utf-8") as f:
    assert len(list(csv.DictReader(f))) == 10  # one eval row per run, the unfinished one too
  table = (tmp_path / "out" / "groups.md").read_text(encoding="utf-8").splitlines()
  assert [line.split(" | ")[1] for line in table[2:]] == [
      "baseline, 4 blocks", "baseline + 1 block", "FT, kappa=1 bits, onehot"]
  assert table[4].endswith("| -0.0667 ± 0.0577 | -0.0167 ± 0.0577 |")


def test_z_onset_finds_the_first_eval_step_at_the_threshold(tmp_path, capsys):
  from experiments import z_onset
  curves = {"seed=0,kappa_bits=1": (0, [(250, 0.001, 0.5, None), (500, -0.004, 0.6, None),
                                        (750, 0.02, 0.9, None), (1000, 0.005, 0.9, None)]),
            "seed=1,kappa_bits=1": (1, [(250, 0.0, 0.4, None), (500, 0.003, 0.5, None)]),
            "seed=0,kappa_bits=4": (0, [(250, 0.5, 3.0, None)])}
  runs, points = z_onset.summarize(curves, threshold=0.01)
  by_run = {r["run"]: r for r in runs}
  assert by_run["seed=0,kappa_bits=1"]["onset_step"] == 750  # the later dip does not undo it
  assert by_run["seed=0,kappa_bits=1"]["max_abs_z_use_before"] == 0.004
  assert by_run["seed=1,kappa_bits=1"]["onset_step"] is None
  assert by_run["seed=0,kappa_bits=4"]["max_abs_z_use_before"] == 0.0
  (one,) = [p for p in points if p["point"] == "kappa_bits=1"]
  assert (one["seeds"], one["started"], one["onset_steps"]) == ("0,1", 1, "750,-")
  assert one["last_z_use_mean"] == pytest.approx(0.004)
  for seed, name in ((0, "seed=0,kappa_bits=1"), (1, "seed=1,baseline")):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"seed": seed}))
    rows = [{"step": 1, "loss": 3.0}, {"step": 250, "eval_ce": 2.0}]
    if "kappa" in name:
      rows += [{"step": 500, "loss": 2.0, "kl_beta": 0.5},
               {"step": 500, "eval_ce": 1.9, "eval_z_use": 0.05, "eval_kl": math.log(2)},
               {"step": 600, "eval_ce": 1.9, "eval_elbo": 2.5, "eval_kl": 1.0}]  # no eval_z_use
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  z_onset.main([f"--root={tmp_path}", f"--out={tmp_path}/out"])
  with open(tmp_path / "out" / "z_use_curves.csv", encoding="utf-8") as f:
    first, second = list(csv.DictReader(f))  # the baseline has no Z use rows
  assert (first["step"], float(first["eval_kl_bits"]), first["kl_beta"]) == ("500", 1.0, "0.5")
  assert float(second["eval_z_use"]) == pytest.approx(0.4)  # 1.9 − (2.5 − 1.0)
  # --also: the committed curves of runs whose directories are gone come back unchanged; a run
  # under a root replaces its earlier curve, and --also_only leaves the others out.
  (tmp_path / "empty").mkdir()
  z_onset.main([f"--root={tmp_path}/empty", f"--out={tmp_path}/again",
                f"--also={tmp_path}/out/z_use_curves.csv"])
  for name in ("z_use_curves.csv", "z_onset.csv", "z_onset_groups.csv"):
    assert ((tmp_path / "again" / name).read_text(encoding="utf-8")
            == (tmp_path / "out" / name).read_text(encoding="utf-8"))
  with open(tmp_path / "again" / "z_use_curves.csv", "a", encoding="utf-8") as f:
    f.write('"seed=2,kappa_bits=1",2,250,0.5,0.1,\n"seed=3,kappa_bits=1",3,250,0.5,0.1,\n')
  z_onset.main([f"--root={tmp_path}", f"--out={tmp_path}/merged", "--also_only=seed=[02],",
                f"--also={tmp_path}/again/z_use_curves.csv"])
  with open(tmp_path / "merged" / "z_onset.csv", encoding="utf-8") as f:
    assert [(r["run"], r["last_step"]) for r in csv.DictReader(f)] == [
        ("seed=0,kappa_bits=1", "600"), ("seed=2,kappa_bits=1", "250")]
  curves = f"--also={tmp_path}/again/z_use_curves.csv"
  for flags, message in (([f"--also={tmp_path}/none.csv"], "--also: no file"),
                         ([f"--also={tmp_path}/again/z_onset.csv"], "no column eval_kl_bits"),
                         ([curves, "--also_only=("], "--also_only: not a regular expression")):
    with pytest.raises(SystemExit) as e:
      z_onset.main([f"--root={tmp_path}", f"--out={tmp_path}/bad", *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_code_drift_rows_compare_each_commit_with_the_first():
  from experiments import code_drift
  rows = code_drift.drift_rows({"a": [{"step": 1, "kl": 2.0}, {"step": 50, "kl": 1.0}],
                                "b": [{"step": 1, "kl": 2.0}, {"step": 50, "kl": 1.5}],
                                "c": [{"step": 1, "kl": 4.0}]}, "a")
  got = {(r["step"], r["commit"]): r["rel_diff_to_first"] for r in rows}
  assert got == {(1, "a"): 0.0, (1, "b"): 0.0, (1, "c"): 1.0, (50, "a"): 0.0, (50, "b"): 0.5}
  assert {r["value"] for r in rows if r["commit"] == "c"} == {"4.0"}
