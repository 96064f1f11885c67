"""A one-node Slurm cluster on this machine that looks like a Perlmutter GPU node.

It lets `sbatch` scripts written for NERSC Perlmutter run unchanged on a laptop
or in CI: `-C gpu`, `-q regular`, `-A <account>`, `--gpus-per-node 4` and
`-c 32 --ntasks-per-node 4` are all accepted.  The four GPUs are fake device
files, so CUDA sees none of them.

    python slurm/local_cluster.py start --dir /tmp/slurm   # prints export lines
    python slurm/local_cluster.py stop --dir /tmp/slurm

Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge.
Everything it writes (config, state, logs, pid files, the munge socket) lives
under the chosen directory; the daemons are stopped through their pid files.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

INSTALL_HINT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge, and run as root"
DAEMONS = ("slurmd", "slurmctld", "munged")  # the order stop() ends them in
COMMANDS = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "srun", "sinfo", "sdiag", "squeue", "scancel")
MUNGE_KEY = Path("/etc/munge/munge.key")
GPUS = 4

# A Perlmutter GPU node has 64 cores (128 hardware threads), 256 GB and 4 A100s.
SLURM_CONF = """\
ClusterName=perlmutter
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire shortens the wait before a requeued job runs again (default ~2.5 min).
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/run/slurmctld.pid
SlurmdPidFile={dir}/run/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
# No cgroups and no database: linuxproc/none plugins work in containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Lets the node advertise more CPUs and memory than this machine has.
SlurmdParameters=config_overrides
ReturnToService=2
# Reject impossible requests at once, as Perlmutter does, instead of queueing them forever.
EnforcePartLimits=ALL
MpiDefault=none
# A task that exits with a non-zero code makes srun kill the step's other tasks. Perlmutter's setting of this is not
# documented; the harsher one here shows that the submit scripts do not depend on it (they pass --kill-on-bad-exit).
KillOnBadExit=1
# Start jobs as soon as they can run, not up to 3 s after their submission or
# up to 60 s after a requeued job may run again.
SchedulerParameters=batch_sched_delay=0,sched_interval=1
# Job ids of their own: two clusters on one machine (two test runs, say) never both write slurm-<name>-1.out.
FirstJobId={first_job_id}
GresTypes=gpu
NodeName=DEFAULT CPUs=128 Boards=1 SocketsPerBoard=1 CoresPerSocket=64 ThreadsPerCore=2 RealMemory=256000
NodeName={host} NodeAddr=127.0.0.1 Gres=gpu:{gpus} Features=gpu State=UNKNOWN
PartitionName=regular Nodes={host} Default=YES DefMemPerNode=200000 MaxTime=INFINITE OverSubscribe=EXCLUSIVE State=UP
"""


class ClusterUnavailable(RuntimeError):
    """The local cluster cannot run here; the message says why and how to fix it."""


def start(workdir: Path) -> dict[str, str]:
    """Start munged, slurmctld and slurmd under `workdir`; return the client environment."""
    workdir = Path(workdir).resolve()
    commands = _find_commands()
    _check_can_run(workdir)
    stop(workdir)  # a cluster left over from an earlier run in the same folder
    conf = _write_config(workdir)
    env = {"SLURM_CONF": str(conf)}
    try:
        _start_munged(workdir, commands)
        _start_slurm(workdir, commands, {**os.environ, **env})
        _wait_until_ready(workdir, {**os.environ, **env})
    except BaseException:
        stop(workdir)
        raise
    return env


def stop(workdir: Path) -> None:
    """Cancel all jobs, then end slurmd, slurmctld and munged by their pid files."""
    workdir = Path(workdir).resolve()
    conf = workdir / "etc" / "slurm.conf"
    if conf.exists() and _running(workdir, "slurmctld"):
        _cancel_all_jobs({**os.environ, "SLURM_CONF": str(conf)})
    for daemon in DAEMONS:
        _terminate(workdir, daemon)


# --- checks -----------------------------------------------------------------


def _find_commands() -> dict[str, str]:
    search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = {name: shutil.which(name, path=search_path) for name in COMMANDS}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise ClusterUnavailable(f"{', '.join(missing)} not found: {INSTALL_HINT}")
    return found


def _check_can_run(workdir: Path) -> None:
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"the local Slurm cluster must be started as root: {INSTALL_HINT}")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        raise ClusterUnavailable(f"user 'munge' does not exist: {INSTALL_HINT}") from None
    if not MUNGE_KEY.exists():
        raise ClusterUnavailable(f"{MUNGE_KEY} is missing: reinstall munge ({INSTALL_HINT})")
    # munged runs as the user 'munge' and must reach its files inside workdir.
    for parent in workdir.parents:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            raise ClusterUnavailable(
                f"{parent} is not searchable by the user 'munge' (mode "
                f"{stat.filemode(parent.stat().st_mode)}): choose a folder under /tmp "
                f"or run 'chmod o+x {parent}'"
            )


# --- configuration ----------------------------------------------------------


def _write_config(workdir: Path) -> Path:
    for sub in ("etc", "state", "spool", "run", "log", "dev"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    for path in [workdir, *workdir.iterdir()]:
        path.chmod(0o755)
    _make_fake_gpus(workdir / "dev")
    host = _short_hostname()
    text = SLURM_CONF.format(
        host=host,
        dir=workdir,
        ctld_port=_free_port(),
        slurmd_port=_free_port(),
        munge_socket=_munge_dir(workdir) / "munge.socket",
        gpus=GPUS,
        first_job_id=1000 * (1 + os.getpid() % 60_000),  # below MaxJobId, 67,043,328
    )
    conf = workdir / "etc" / "slurm.conf"
    conf.write_text(text)
    # slurmd reads gres.conf from the folder slurm.conf is in.  Without File=
    # Slurm drops the GPUs and drains the node.
    last = GPUS - 1
    (workdir / "etc" / "gres.conf").write_text(f"Name=gpu File={workdir}/dev/nvidia[0-{last}]\n")
    return conf


def _make_fake_gpus(dev: Path) -> None:
    # Character devices with /dev/null's numbers: Slurm only checks they exist.
    for index in range(GPUS):
        path = dev / f"nvidia{index}"
        if not path.exists():
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def _free_port() -> int:
    # Fresh ports, so a stale cluster from an earlier run cannot answer instead.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _munge_dir(workdir: Path) -> Path:
    return workdir / "munge"


# --- starting the daemons ---------------------------------------------------


def _start_munged(workdir: Path, commands: dict[str, str]) -> None:
    munge_dir = _munge_dir(workdir)
    munge_dir.mkdir(mode=0o755, exist_ok=True)
    shutil.chown(munge_dir, "munge", "munge")
    command = [
        commands["munged"],
        f"--socket={munge_dir}/munge.socket",
        f"--pid-file={munge_dir}/munged.pid",
        f"--log-file={munge_dir}/munged.log",
        f"--seed-file={munge_dir}/munged.seed",
    ]
    _run_daemon(command, munge_dir / "munged.log", user="munge")
    socket_path = str(munge_dir / "munge.socket")
    credential = _run([commands["munge"], "-n", "-S", socket_path], munge_dir / "munged.log")
    _run([commands["unmunge"], "-S", socket_path], munge_dir / "munged.log", stdin=credential)


def _start_slurm(workdir: Path, commands: dict[str, str], env: dict[str, str]) -> None:
    # -c: start from a clean state, without jobs or drained nodes of a past run.
    _run_daemon([commands["slurmctld"], "-c"], workdir / "log" / "slurmctld.log", env=env)
    _run_daemon([commands["slurmd"]], workdir / "log" / "slurmd.log", env=env)


def _run_daemon(command: list[str], log: Path, user: str | None = None, env: dict[str, str] | None = None) -> None:
    """Run a daemon that forks into the background, and fail if it did not."""
    user_args = {"user": user, "group": user, "extra_groups": []} if user else {}
    result = subprocess.run(command, env=env, capture_output=True, text=True, **user_args)
    if result.returncode != 0:
        raise _failure(f"{command[0]} exited with {result.returncode}", log, result)


def _run(command: list[str], log: Path, stdin: str | None = None) -> str:
    result = subprocess.run(command, input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise _failure(f"'{shlex.join(command)}' failed", log, result)
    return result.stdout


def _failure(what: str, log: Path, result: subprocess.CompletedProcess | None = None) -> ClusterUnavailable:
    """An error that says what failed, with the command's output and the end of the daemon's log."""
    output = (result.stdout + result.stderr).strip() if result else ""
    lines = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
    parts = [what, output, f"Last lines of {log}:", *lines] if lines else [what, output, f"{log} is empty or missing."]
    return ClusterUnavailable("\n".join(part for part in parts if part))


def _wait_until_ready(workdir: Path, env: dict[str, str], timeout: float = 30) -> None:
    log = workdir / "log" / "slurmd.log"
    _wait_until_idle(log, env, timeout)
    # sinfo can say idle while slurmd is dead: only a job proves the node works.
    try:
        result = subprocess.run(["srun", "-n1", "true"], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _failure(f"'srun -n1 true' did not finish in {timeout} s", log) from None
    if result.returncode != 0:
        raise _failure("'srun -n1 true' failed", log, result)
    # A job submitted while the node is still busy with that one waits for the
    # next pass of the scheduler, and its first pass comes 3 s after the start.
    _wait_until_idle(log, env, timeout)
    _wait_for_first_scheduler_pass(workdir / "log" / "slurmctld.log", env, timeout)


def _wait_until_idle(log: Path, env: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while state != "idle":
        if time.monotonic() > deadline:
            raise _failure(f"the node did not become idle in {timeout} s (state '{state}')", log)
        time.sleep(0.1)
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        state = result.stdout.strip()
        if "drain" in state:
            reason = subprocess.run(["sinfo", "-h", "-R"], env=env, capture_output=True, text=True)
            raise _failure(f"the node is {state}: {reason.stdout.strip()}", log)


def _wait_for_first_scheduler_pass(log: Path, env: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(["sdiag"], env=env, capture_output=True, text=True)
        match = re.search(r"Total cycles: *(\d+)", result.stdout)
        if match and int(match.group(1)) > 0:
            return
        if time.monotonic() > deadline:
            raise _failure(f"the scheduler did not run in {timeout} s", log, result)
        time.sleep(0.2)


# --- stopping ---------------------------------------------------------------


def _cancel_all_jobs(env: dict[str, str], timeout: float = 30) -> None:
    def job_ids() -> list[str]:
        result = subprocess.run(["squeue", "-h", "-o", "%A"], env=env, capture_output=True, text=True, timeout=15)
        return result.stdout.split() if result.returncode == 0 else []

    try:
        jobs = job_ids()
        if jobs:
            subprocess.run(["scancel", *jobs], env=env, capture_output=True, timeout=15)
        deadline = time.monotonic() + timeout
        while jobs and time.monotonic() < deadline:
            time.sleep(0.5)
            jobs = job_ids()
    except (OSError, subprocess.TimeoutExpired):
        pass  # stop the daemons anyway


def _pid_file(workdir: Path, daemon: str) -> Path:
    if daemon == "munged":
        return _munge_dir(workdir) / "munged.pid"
    return workdir / "run" / f"{daemon}.pid"


def _pid(workdir: Path, daemon: str) -> int | None:
    """The daemon's pid if its pid file names a live process of that daemon."""
    try:
        pid = int(_pid_file(workdir, daemon).read_text().split()[0])
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    zombie = "\nState:\tZ" in status
    # A pid may be reused after a crash: only signal a process of that daemon.
    same_program = Path(cmdline.split(b"\0")[0].decode(errors="replace")).name == daemon
    return pid if same_program and not zombie else None


def _running(workdir: Path, daemon: str) -> bool:
    return _pid(workdir, daemon) is not None


def _terminate(workdir: Path, daemon: str, timeout: float = 10) -> None:
    pid = _pid(workdir, daemon)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):  # it may end on its own meanwhile
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid(workdir, daemon) == pid:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)


# --- command line -----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A one-node Slurm cluster that looks like a Perlmutter GPU node.",
                                     allow_abbrev=False)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, required=True, help="folder for config, state and logs")
    args = parser.parse_args(argv)
    if args.action == "stop":
        stop(args.dir)
        return 0
    try:
        env = start(args.dir)
    except ClusterUnavailable as error:
        print(f"local Slurm cluster unavailable: {error}", file=sys.stderr)
        return 1
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
