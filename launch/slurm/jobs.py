"""The sweep's SLURM calls: submit a job array (sbatch), read the queue (squeue), and the job
record (`slurm.json`) kept in each submitted point's run directory."""

import json
import os
import shutil
import subprocess
import time

from ftjax import storage
from ftjax.errors import SlurmError

RECORD = "slurm.json"
# The batch script of `launch.sweep --launcher=slurm` (its --sweep form; see its header).
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_gpu.sbatch")


def _require(command):
  if shutil.which(command) is None:
    raise SlurmError(f"{command} is not on PATH (SLURM's client commands are needed)")


def _run(cmd):
  """The stdout of `cmd`; SlurmError when it is not on PATH or fails."""
  _require(cmd[0])
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode:
    lines = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()
    raise SlurmError(f"{cmd[0]} failed: {lines[-1]}")
  return done.stdout


def submit_array(script, indices, script_args, sbatch_args, log_dir):
  """Submits `script` once as a job array of `indices` (its tasks' SLURM_ARRAY_TASK_ID), with
  `script_args` as the script's arguments and logs in log_dir/<array job>_<index>.out; returns
  the array's job id."""
  _require("sbatch")
  os.makedirs(log_dir, exist_ok=True)  # SLURM opens the logs but makes no folders
  out = _run(["sbatch", "--parsable", f"--array={','.join(map(str, indices))}",
              f"--output={os.path.join(log_dir, '%A_%a.out')}", *sbatch_args, script,
              *script_args])
  return out.strip().split(";")[0]  # --parsable: "jobid[;cluster]"


def queue():
  """{job id ('123_4': task 4 of array 123): state ('PENDING', 'RUNNING', ...)} of this user's
  jobs in the queue."""
  out = _run(["squeue", "--me", "--noheader", "--array", "--format=%i %T"])
  return dict(line.split()[:2] for line in out.splitlines() if line.strip())


def write_record(workdir, job_id, log):
  """Records in `workdir` (created if need be) the job submitted to run it."""
  storage.makedirs(workdir)
  record = {"job_id": job_id, "log": log, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  storage.write_bytes(storage.join(workdir, RECORD), json.dumps(record).encode())


def read_record(workdir):
  """The job record of `workdir` ({'job_id', 'log', 'submitted'}), or None."""
  try:
    return json.loads(storage.read_bytes(storage.join(workdir, RECORD)))
  except (OSError, json.JSONDecodeError):
    return None
