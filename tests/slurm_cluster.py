"""A real one-node SLURM for tests: Debian's slurmctld, slurmd and munged, started in a directory.

`SlurmCluster(directory).start()` writes a minimal `slurm.conf` for this host (no cgroups, no
accounting, the host's name as its one node with 2 CPUs, one partition), a munge key and socket of
its own, starts `munged`, `slurmctld` and `slurmd` on free ports, and waits until the node takes
jobs; `stop()` ends exactly the daemons it started, by their process ids. Commands run with
`env()`, where `SLURM_CONF` names this cluster's config, so another SLURM on the host is not
touched.

`install_reason()` installs the packages with apt when they are missing and the tests run as root
on a Debian-like system, and otherwise says why the tests cannot run.

  python tests/slurm_cluster.py /tmp/slurm   # a cluster to try commands by hand; Ctrl-C stops it
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")
NODE_CPUS = 2

_installed: str | None | bool = False  # False: not tried yet; None: installed; str: why not.


def _missing() -> list[str]:
  return [command for command in COMMANDS if shutil.which(command) is None
          and not os.path.exists(f"/usr/sbin/{command}")]


def install_reason() -> str | None:
  """None once SLURM and munge can run here (installing them with apt if need be, once per
  process), else why they cannot."""
  global _installed
  if _installed is not False:
    return _installed
  _installed = None
  if _missing():
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
      _installed = (f"SLURM is not installed ({', '.join(_missing())} missing) and these tests "
                    f"install it only as root with apt-get: apt-get install {' '.join(PACKAGES)}")
      return _installed
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
      result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
      if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        _installed = f"{' '.join(command[:2])} failed ({tail})"
        return _installed
    if _missing():
      _installed = f"apt installed {' '.join(PACKAGES)} but {', '.join(_missing())} are missing"
  return _installed


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("", 0))
    return s.getsockname()[1]


def _daemon(name: str) -> str:
  return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
  """One controller and one node on this host, in `directory`; see the module docstring."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    self.node = socket.gethostname().split(".")[0]
    self.conf = os.path.join(self.directory, "slurm.conf")
    self._daemons: list[subprocess.Popen] = []

  def path(self, *names: str) -> str:
    return os.path.join(self.directory, *names)

  def env(self, **extra: str) -> dict[str, str]:
    """The environment for SLURM commands against this cluster (and the jobs they submit)."""
    return {**os.environ, "SLURM_CONF": self.conf, **extra}

  def _write_config(self) -> None:
    for name in ("state", "spool", "munge"):
      os.makedirs(self.path(name), mode=0o700, exist_ok=True)
    with open(self.path("munge", "munge.key"), "wb") as f:
      os.fchmod(f.fileno(), 0o600)
      f.write(os.urandom(1024))
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", str(os.geteuid()))
    lines = {
        "ClusterName": "mnistjax",
        "SlurmctldHost": self.node,
        "SlurmUser": user,
        "SlurmdUser": user,
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={self.path('munge', 'munge.socket')}",
        "SlurmctldPort": str(_free_port()),
        "SlurmdPort": str(_free_port()),
        "StateSaveLocation": self.path("state"),
        "SlurmdSpoolDir": self.path("spool"),
        "SlurmctldPidFile": self.path("slurmctld.pid"),
        "SlurmdPidFile": self.path("slurmd.pid"),
        "SlurmctldLogFile": self.path("slurmctld.log"),
        "SlurmdLogFile": self.path("slurmd.log"),
        # No cgroups: containers and CI machines rarely delegate them.
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_CPU",
        "SchedulerType": "sched/builtin",
        "MpiDefault": "none",
        "ReturnToService": "2",
        "JobRequeue": "1",
        "KillWait": "30",
        "SlurmctldTimeout": "30",
        "SlurmdTimeout": "30",
        "InactiveLimit": "0",
        "MinJobAge": "600",
    }
    text = "".join(f"{key}={value}\n" for key, value in lines.items())
    text += f"NodeName={self.node} CPUs={NODE_CPUS} State=UNKNOWN\n"
    text += f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP\n"
    with open(self.conf, "w", encoding="utf-8") as f:
      f.write(text)

  def _start(self, *command: str) -> None:
    with open(self.path(f"{os.path.basename(command[0])}.out"), "w", encoding="utf-8") as log:
      self._daemons.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env(), start_new_session=True))

  def start(self, timeout_s: float = 60) -> None:
    """Writes the config, starts the three daemons in the foreground of their own sessions, and
    waits until the node is idle; on failure stops them and raises RuntimeError with the logs."""
    self._write_config()
    try:
      self._start(_daemon("munged"), "--foreground", "--force",
                  f"--socket={self.path('munge', 'munge.socket')}",
                  f"--key-file={self.path('munge', 'munge.key')}",
                  f"--pid-file={self.path('munge', 'munged.pid')}",
                  f"--log-file={self.path('munge', 'munged.log')}",
                  f"--seed-file={self.path('munge', 'munged.seed')}")
      self.wait_for(lambda: os.path.exists(self.path("munge", "munge.socket")), 10, "munged")
      self._start(_daemon("slurmctld"), "-D", "-i", "-f", self.conf)
      self.wait_for(lambda: self.run("scontrol", "ping").returncode == 0, timeout_s, "slurmctld")
      self._start(_daemon("slurmd"), "-D", "-f", self.conf, "-N", self.node)
      self.wait_for(self._node_idle, timeout_s, "slurmd")
    except BaseException:
      self.stop()
      raise

  def _node_idle(self) -> bool:
    result = self.run("sinfo", "--noheader", "--format=%t", "--nodes", self.node)
    return result.returncode == 0 and result.stdout.strip() == "idle"

  def wait_for(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Waits until `ready()`; RuntimeError naming `what`, with the daemons' logs, when a daemon
    exits or `timeout_s` pass first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
      exited = [d.args[0] for d in self._daemons if d.poll() is not None]
      if exited or time.monotonic() > deadline:
        why = f"{', '.join(exited)} exited" if exited else f"{timeout_s} s passed"
        raise RuntimeError(f"{why} while waiting for {what}\n{self.logs()}")
      time.sleep(0.2)

  def logs(self) -> str:
    """The tail of every daemon's log, for a failure message."""
    tails = []
    for name in sorted(os.listdir(self.directory)):
      if name.endswith((".log", ".out")):
        with open(self.path(name), encoding="utf-8", errors="replace") as f:
          tails.append(f"--- {name}\n" + "".join(f.readlines()[-15:]))
    return "\n".join(tails)

  def stop(self) -> None:
    """Ends the daemons this object started, last first, and the jobs they still run."""
    if self._daemons and self._daemons[0].poll() is None:
      self.run("scancel", "--full", "--partition=test", timeout=10)
    for daemon in reversed(self._daemons):
      if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
          daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
          daemon.kill()
          daemon.wait()
    self._daemons.clear()

  def run(self, *command: str, timeout: float = 60, **extra_env: str
          ) -> subprocess.CompletedProcess:
    """A SLURM command against this cluster, its output captured."""
    try:
      return subprocess.run(command, env=self.env(**extra_env), capture_output=True, text=True,
                            timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
      return subprocess.CompletedProcess(command, 124, e.stdout or "", f"timed out: {e}")

  def sbatch(self, *args: str, **extra_env: str) -> str:
    """Submits a batch job (`sbatch --parsable args...`); its job id."""
    result = self.run("sbatch", "--parsable", *args, **extra_env)
    if result.returncode != 0:
      raise RuntimeError(f"sbatch {' '.join(args)} failed: {result.stderr}")
    return result.stdout.strip().split(";")[0]

  def start_now(self, job_id: str) -> None:
    """Lets a pending job start as soon as the node can run it (`StartTime=now`).

    For a job that `scontrol requeue` sent back (SLURM holds those for two minutes), call it once
    the job is PENDING again: slurmd refuses a launch whose credential dates from the second in
    which the job's previous credential was revoked (it keeps whole seconds), and the job then
    fails without a line of output. So the update waits for the next second first.
    """
    second = int(time.time())
    while int(time.time()) <= second:
      time.sleep(0.05)
    result = self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    if result.returncode != 0:
      raise RuntimeError(f"scontrol update JobId={job_id} StartTime=now failed: {result.stderr}")

  def job_states(self, job_id: str) -> dict[str, str]:
    """Job (or array task) id -> state, of the jobs still known to the controller."""
    result = self.run("scontrol", "show", "job", "--oneliner", job_id)
    states = {}
    for line in result.stdout.splitlines():
      fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
      task = fields.get("ArrayTaskId")
      name = f"{fields.get('ArrayJobId')}_{task}" if task else fields.get("JobId", "")
      states[name] = fields.get("JobState", "")
    return states

  def wait(self, job_id: str, timeout_s: float) -> dict[str, str]:
    """Waits until every task of `job_id` has ended; their final states (RuntimeError on time
    out, with the daemons' logs)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      states = self.job_states(job_id)
      if states and all(state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING",
                                      "REQUEUED", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
                                      "REQUEUE_FED", "STAGE_OUT", "SIGNALING")
                        for state in states.values()):
        return states
      time.sleep(0.5)
    raise RuntimeError(f"job {job_id} still runs after {timeout_s} s: {self.job_states(job_id)}"
                       f"\n{self.logs()}")


if __name__ == "__main__":
  reason = install_reason()
  if reason:
    sys.exit(reason)
  cluster = SlurmCluster(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slurm_cluster")
  os.makedirs(cluster.directory, exist_ok=True)
  cluster.start()
  print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C or SIGTERM stops the cluster", flush=True)
  signal.signal(signal.SIGTERM, signal.default_int_handler)
  try:
    signal.pause()
  except KeyboardInterrupt:
    pass
  finally:
    cluster.stop()
