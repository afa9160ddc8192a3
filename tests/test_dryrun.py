"""launch.dryrun: ahead-of-time compilation on simulated devices, memory report, exit codes."""

import json
import subprocess
import sys

from tests.conftest import REPO


def _dryrun(*flags):
  return subprocess.run([sys.executable, "-m", "launch.dryrun", "--config=experiments/tiny.py",
                         *flags], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_tiny_dry_run_reports_memory_and_flops():
  result = _dryrun("--num_devices=8", "--mesh=data=2,fsdp=2,tensor=2", "--json",
                   "--config.model.remat_policy=full")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["fits"] and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert report["config_params"] == 30_624 and report["remat_policy"] == "full"
  gb = report["per_device_gb"]
  assert gb["arguments"] > 0 and gb["total"] >= gb["temporaries"]
  assert report["flops_per_step"] == report["flops_per_token"] * 4 * 66
  assert "per device: total" in result.stdout


def test_dry_run_exits_1_when_it_does_not_fit_and_searches():
  result = _dryrun("--num_devices=2", "--hbm_gb=0.001")
  assert result.returncode == 1 and "DOES NOT FIT" in result.stdout
  # batch 4 on tiny's one-device mesh: the largest accumulation (4) is tried first, then remat
  assert "grad_accum_steps=4, remat_policy=none:" in result.stdout
  assert "grad_accum_steps=4, remat_policy=full:" in result.stdout
  assert "no gradient accumulation or remat policy fits" in result.stdout


def test_dry_run_mesh_errors_exit_2():
  result = _dryrun("--num_devices=8", "--mesh=data=3")
  assert result.returncode == 2 and "does not divide the 8 devices" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  result = _dryrun("--num_devices=8", "--mesh=pipeline=2")
  assert result.returncode == 2 and "--mesh" in result.stderr
