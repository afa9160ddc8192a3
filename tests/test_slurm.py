"""ftjax under a real one-node SLURM cluster: munged, slurmctld and slurmd on 127.0.0.1, started
here from Debian's `slurm-wlm` and `munge` (`.ci/install_slurm` installs them; skipped without
them). launch/slurm/train_gpu.sbatch runs as it is, its GPU resources overridden on the command
line: a two-task run whose processes find each other through jax's SLURM detection equals one
process, a requeued job resumes bit-identically, and a sweep through --launcher=slurm."""

import csv
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from launch.slurm import jobs
from tests.conftest import REPO
from tests.test_fault_tolerance import FLAGS, _final_params, _last_step, _rows
from tests.test_multiprocess import FLAGS as TWO_PROCESS_FLAGS, _env

DAEMONS = ("munged", "slurmctld", "slurmd")
SCRIPT = "launch/slurm/train_gpu.sbatch"
# The script's GPU node shrunk to this CPU node: tasks of one CPU, no GPUs.
CPU_NODE = ["--cpus-per-task=1", "--gpus-per-node=0"]
SWEEP = "tests/sweep_tiny.py"
THREE_POINTS = "--only=log_every=2|eval_batches=1"  # 3 of sweep_tiny's 4 points

SLURM_CONF = """\
ClusterName=ftjaxtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/munge.socket
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
FirstJobId={first_job}
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _binary(name):
  return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Cluster:
  """A one-node SLURM cluster in a temporary directory; SLURM_CONF points the clients at it."""

  def __init__(self):
    self.dir = tempfile.mkdtemp(prefix="ftjax-slurm-")
    os.chmod(self.dir, 0o755)  # munged wants its socket's folders open to all
    for sub in ("munge", "state", "spool"):
      os.makedirs(os.path.join(self.dir, sub))
    key = os.path.join(self.dir, "munge", "munge.key")
    with open(key, "wb") as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    self.conf = os.path.join(self.dir, "slurm.conf")
    with open(self.conf, "w", encoding="utf-8") as f:  # jax's SLURM port: job id % 4096 + 61440
      f.write(SLURM_CONF.format(dir=self.dir, ctld_port=_free_port(), slurmd_port=_free_port(),
                                first_job=random.randrange(1000, 60000)))
    self.procs = []

  def start(self):
    munge = os.path.join(self.dir, "munge")
    self._daemon("munged", "-F", f"--key-file={munge}/munge.key",
                 f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
                 f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed")
    self._wait(lambda: os.path.exists(f"{munge}/munge.socket"), "munged")
    self._daemon("slurmctld", "-D", "-c", "-f", self.conf)
    self._daemon("slurmd", "-D", "-N", "localhost", "-f", self.conf)
    self._wait(lambda: self.run("sinfo", "--noheader", "--format=%t", check=False) == "idle",
               "slurmd")

  def _daemon(self, name, *args):
    with open(os.path.join(self.dir, f"{name}.out"), "w", encoding="utf-8") as log:
      self.procs.append(subprocess.Popen([_binary(name), *args], stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env()))

  def _wait(self, ready, what, timeout=60):
    deadline = time.time() + timeout
    while not ready():
      if time.time() > deadline or any(p.poll() is not None for p in self.procs):
        self.stop()
        raise RuntimeError(f"the test cluster's {what} did not start: {self.logs()}")
      time.sleep(0.2)

  def logs(self):
    """The last lines of every daemon's log."""
    out = []
    for name in os.listdir(self.dir):
      if name.endswith((".out", ".log")):
        with open(os.path.join(self.dir, name), encoding="utf-8", errors="replace") as f:
          out.append(f"{name}: " + " | ".join(f.read().splitlines()[-5:]))
    return "\n".join(out)

  def env(self, base=None):
    """`base` (os.environ) with this cluster's SLURM_CONF and this Python first on PATH (the
    batch script runs `python`)."""
    env = dict(os.environ if base is None else base)
    env["SLURM_CONF"] = self.conf
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env

  def run(self, *cmd, check=True, env=None):
    done = subprocess.run(cmd, capture_output=True, text=True, env=env or self.env(), cwd=REPO,
                          timeout=120, check=False)
    assert not check or done.returncode == 0, (cmd, done.stderr, self.logs())
    return done.stdout.strip()

  def wait_gone(self, job, timeout=300):
    """Waits until job `job` (every task of an array) has left the queue."""
    deadline = time.time() + timeout
    while any(j.split("_")[0] == str(job) for j in jobs.queue()):
      assert time.time() < deadline, (jobs.queue(), self.logs())
      time.sleep(0.5)

  def stop(self):
    """Cancels every job, waits for the queue to empty, then stops the daemons."""
    if self.procs and all(p.poll() is None for p in self.procs):
      self.run("scancel", "--me", check=False)
      deadline = time.time() + 60
      while self.run("squeue", "--noheader", check=False) and time.time() < deadline:
        time.sleep(0.5)
    for proc in reversed(self.procs):
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(timeout=20)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    self.procs = []
    shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm():
  missing = [d for d in DAEMONS if _binary(d) is None]
  if missing:
    pytest.skip(f"SLURM is not installed (no {', '.join(missing)}): run .ci/install_slurm")
  if os.geteuid() != 0:
    pytest.skip("the test SLURM cluster runs its daemons as root")
  cluster = Cluster()
  cluster.start()
  with pytest.MonkeyPatch.context() as patch:  # the sweep's sbatch and squeue find it
    patch.setenv("SLURM_CONF", cluster.conf)
    patch.setenv("PATH", cluster.env()["PATH"])
    try:
      yield cluster
    finally:
      cluster.stop()


def _sbatch(slurm, *args, env=None):
  """The job id of `sbatch args` (from the repository root: the script runs `python -m`)."""
  return slurm.run("sbatch", "--parsable", *args, env=env).split(";")[0]


def _log(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


@pytest.mark.slow  # two fresh compilations of the two-device step (one per process)
def test_two_task_run_finds_its_peer_and_equals_one_process(slurm, tmp_path):
  single = subprocess.run([sys.executable, "-m", "launch.train", *TWO_PROCESS_FLAGS,
                           f"--workdir={tmp_path / 'single'}"], cwd=REPO, env=_env(2),
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  # Two tasks of one CPU device each: no coordinator flags, jax reads SLURM's environment.
  job = _sbatch(slurm, "--wait", "--ntasks-per-node=2", *CPU_NODE,
                f"--output={tmp_path / 'job.out'}", SCRIPT, "experiments/tiny.py",
                str(tmp_path / "multi"), *TWO_PROCESS_FLAGS[1:], env=slurm.env(_env(1)))
  log = _log(tmp_path / "job.out")
  assert job and log.count("step 6/6") == 1, log[-3000:]  # process 0 alone logs
  assert _rows(tmp_path / "multi") == _rows(tmp_path / "single")  # every metric, bit for bit
  (multi, _), (ref, _) = _final_params(tmp_path / "multi"), _final_params(tmp_path / "single")
  jax.tree_util.tree_map(np.testing.assert_array_equal, multi, ref)


def _wait_for_step(slurm, workdir, step, timeout=240):
  deadline = time.time() + timeout
  while _last_step(workdir) < step:
    assert time.time() < deadline, slurm.logs()
    time.sleep(0.1)


def test_requeued_job_resumes_bit_identically(slurm, tmp_path):
  # A save every step (host-side) makes steps 3-20 last seconds: the signal lands before the end.
  flags = [*FLAGS, "--config.checkpoint.every_steps=1"]
  ref = subprocess.Popen([sys.executable, "-m", "launch.train", *flags,
                          f"--workdir={tmp_path / 'ref'}"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  run, out = tmp_path / "run", tmp_path / "job.out"
  job = _sbatch(slurm, "--ntasks-per-node=1", *CPU_NODE, f"--output={out}", SCRIPT,
                flags[0].split("=", 1)[1], str(run), *flags[1:])
  _wait_for_step(slurm, run, 3)
  slurm.run("scontrol", "requeue", job)  # SIGTERM to the step: the loop saves and returns
  deadline = time.time() + 120
  while "BeginTime" not in slurm.run("squeue", "--noheader", f"--jobs={job}", "--format=%r"):
    assert time.time() < deadline, slurm.logs()
    time.sleep(0.2)
  slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # not SLURM's 2-minute delay
  slurm.wait_gone(job)
  _, err = ref.communicate(timeout=300)
  assert ref.returncode == 0, err[-3000:]
  log = _log(out)
  assert "DUE TO JOB REQUEUE" in log and "stopped by a signal at step " in log, log[-3000:]
  stopped = int(log.split("stopped by a signal at step ")[1].split(":")[0])
  assert f"resumed from step {stopped}" in log and 3 <= stopped < 20, log[-3000:]
  assert _rows(run) == _rows(tmp_path / "ref")  # every metric of every step, bit for bit
  (params, step), (ref_params, ref_step) = _final_params(run), _final_params(tmp_path / "ref")
  assert step == ref_step == 20
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref_params)


def _sweep(root, *flags):
  done = subprocess.run([sys.executable, "-m", "launch.sweep", f"--config={SWEEP}",
                         f"--workdir={root}", THREE_POINTS, *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def _status(root):
  """{point: row} of the --status table."""
  lines = _sweep(root, "--status").splitlines()
  keys = [k.strip() for k in lines[0].strip("|").split("|")]
  return {r["point"]: r for r in (dict(zip(keys, (v.strip() for v in line.strip("|").split("|"))))
                                  for line in lines[2:])}


def _submitted(stdout):
  """{point: job id} of the points a --launcher=slurm call submitted."""
  return dict(line[1:].split("] submitted: job ") for line in stdout.splitlines()
              if "] submitted: job " in line)


def test_sweep_through_slurm_submits_skips_and_resubmits(slurm, tmp_path):
  root = tmp_path / "sweep"
  submit = ["--launcher=slurm", f"--sbatch_args=--ntasks-per-node=1 {' '.join(CPU_NODE)}"]
  first = _submitted(_sweep(root, *submit))
  assert len(first) == 3 and "log_every=5,eval_batches=2" not in first
  array = {j.split("_")[0] for j in first.values()}
  assert len(array) == 1  # one job array
  # Two tasks of one CPU run at once; the third, cancelled in the queue, is submitted again.
  cancelled = max(first, key=lambda p: int(first[p].split("_")[1]))
  slurm.run("scancel", first[cancelled])
  status = _status(root)
  assert {p: r["job"] for p, r in status.items()} == first
  assert status[cancelled]["state"] == "stopped"
  assert all(r["state"] in ("pending", "running") for p, r in status.items() if p != cancelled)
  again = _sweep(root, *submit)
  assert list(_submitted(again)) == [cancelled] and again.count(", skipped") == 2, again
  slurm.wait_gone(array.pop())
  slurm.wait_gone(_submitted(again)[cancelled].split("_")[0])
  # The last task's own --status wrote the summary: the final metrics of every point.
  with open(root / "summary.csv", encoding="utf-8") as f:
    summary = {r["point"]: r for r in csv.DictReader(f)}
  assert sorted(summary) == sorted(first)
  for name, row in summary.items():
    last = {k: v for r in _rows(root / name) for k, v in r.items()}
    assert row["step"] == "20" and float(row["eval_ce"]) == last["eval_ce"], (name, row)
  # Logging cadence is host-side: the two points that evaluate one batch trained alike.
  assert summary["log_every=2,eval_batches=1"]["eval_ce"] == \
      summary["log_every=5,eval_batches=1"]["eval_ce"]
  status = _status(root)
  assert all(r["state"] == "finished" and r["step"] == "20" for r in status.values()), status
  final = _sweep(root, *submit)
  assert final.count("] finished (job ") == 3 and "nothing to submit" in final
  assert f"[{cancelled}] " in _log(jobs.read_record(root / cancelled)["log"])  # its array task
