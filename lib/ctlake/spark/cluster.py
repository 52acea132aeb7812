"""A real Spark standalone cluster (and History Server) on 127.0.0.1, from the installed pyspark.

The pip ``pyspark`` ships ``bin/spark-class`` but not the ``sbin/start-*.sh``
scripts, so the master, the workers and the History Server are started here
as ``spark-class`` processes (``spark-class`` execs the JVM, so the process
started is the server itself).  Every server is bound to 127.0.0.1, logs to a
file in the cluster's folder, and is recorded there by pid in
``cluster.json``: ``stop`` stops exactly those processes, and only while the
pid still runs the class it was started as (a pid the system gave to another
program since is left alone).

The test fixture and ``make cluster-up`` / ``cluster-down`` / ``history``
share this module::

    python -m ctlake.spark.cluster up --folder .cache/cluster --workers 2
    python -m ctlake.spark.cluster down --folder .cache/cluster
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyspark

from ctlake.errors import ConfigError

SPARK_HOME = Path(pyspark.__file__).parent
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
HISTORY_CLASS = "org.apache.spark.deploy.history.HistoryServer"
STATE_FILE = "cluster.json"


class ClusterError(RuntimeError):
    """A server did not start, or did not register, within its time."""


@dataclass
class Server:
    """One started JVM: its role, pid, log file and web UI port."""

    role: str
    main_class: str
    pid: int
    log: str
    web_ui_port: int


@dataclass
class ClusterState:
    """What ``up`` started, saved in the cluster's folder so ``down`` (another process) can stop it."""

    folder: str
    master_url: str | None = None
    servers: list[Server] = field(default_factory=list)

    def save(self) -> None:
        Path(self.folder, STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> ClusterState:
        path = Path(folder, STATE_FILE)
        if not path.is_file():
            return cls(str(folder))
        raw = json.loads(path.read_text())
        return cls(raw["folder"], raw["master_url"], [Server(**s) for s in raw["servers"]])

    def workers(self) -> list[Server]:
        return [s for s in self.servers if s.main_class == WORKER_CLASS]

    def server(self, role: str) -> Server:
        return next(s for s in self.servers if s.role == role)


def free_port() -> int:
    """A port free on 127.0.0.1 now (each server gets its own, so clusters and tests never collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(python: str | None) -> dict:
    env = {**os.environ, "SPARK_HOME": str(SPARK_HOME), "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_NO_DAEMONIZE": "1"}
    if python:
        env["PYSPARK_PYTHON"] = python
    return env


def _launch(state: ClusterState, role: str, main_class: str, arguments: list[str], web_ui_port: int,
            env: dict) -> Server:
    log_path = Path(state.folder, f"{role}.log")
    with log_path.open("w") as log:
        # A session of its own: the server outlives `make cluster-up`, and Ctrl-C in a test run
        # does not reach it (stop() does).
        process = subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), main_class, *arguments], env=env,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = Server(role, main_class, process.pid, str(log_path), web_ui_port)
    state.servers.append(server)
    state.save()
    return server


def wait_for_log(server: Server, text: str, seconds: float = 90) -> None:
    """Block until ``text`` is in the server's log; a server that exits or stays silent is an error.

    Liveness here is the pid alone, not :func:`_running`'s command-line check:
    right after the launch ``/proc/<pid>/cmdline`` can still read empty, and
    that check made a server just started look dead (the test suite's
    history server "did not log" with an empty log, at once).  The pid is our
    unreaped child, so it cannot belong to another program yet.
    """
    started = time.monotonic()
    path = Path(server.log)
    while time.monotonic() < started + seconds:
        if text in path.read_text(errors="replace"):
            return
        if not _alive(server.pid):
            break
        time.sleep(0.3)
    waited = time.monotonic() - started
    ended = "" if _alive(server.pid) else ", and its process ended"
    tail = path.read_text(errors="replace")[-2000:]
    raise ClusterError(f"{server.role} (pid {server.pid}) did not log {text!r} in {waited:.0f} s{ended}:\n{tail}")


def start(folder: str | Path, workers: int = 2, cores: int = 1, memory: str = "2g",
          python: str | None = None) -> ClusterState:
    """Start a master and ``workers`` workers (``cores`` and ``memory`` each) and wait until all registered.

    ``python`` is the interpreter the workers start for PySpark tasks when a
    job does not ship its own (``spark.archives``); default: whatever
    ``PYSPARK_PYTHON`` the job sets.  Anything started is stopped again if
    the cluster does not come up whole.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if any(_running(s) for s in ClusterState.load(folder).servers):
        raise ClusterError(f"a cluster from {folder} is still running: stop it first")
    state, env = ClusterState(str(folder)), _environment(python)
    try:
        port, ui = free_port(), free_port()
        master = _launch(state, "master", MASTER_CLASS,
                         ["--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui)], ui, env)
        wait_for_log(master, "I have been elected leader")
        state.master_url = f"spark://127.0.0.1:{port}"
        state.save()
        for index in range(1, workers + 1):
            _launch_worker(state, index, cores, memory, env)
        for worker in state.workers():
            wait_for_log(worker, "Successfully registered with master")
    except BaseException:
        stop(folder)
        raise
    return state


def _launch_worker(state: ClusterState, index: int, cores: int, memory: str, env: dict) -> Server:
    ui = free_port()
    return _launch(state, f"worker-{index}", WORKER_CLASS,
                   [state.master_url, "--host", "127.0.0.1", "--cores", str(cores), "--memory", memory,
                    "--webui-port", str(ui), "--work-dir", str(Path(state.folder) / f"work-{index}")], ui, env)


def add_worker(folder: str | Path, cores: int = 1, memory: str = "2g", python: str | None = None) -> Server:
    """Start one more worker for the running master of ``folder`` (after a lost one) and wait until it registered."""
    state = ClusterState.load(Path(folder).resolve())
    if not state.master_url:
        raise ClusterError(f"no master runs from {folder}: start a cluster first")
    index = 1 + max((int(s.role.split("-")[1]) for s in state.workers()), default=0)
    worker = _launch_worker(state, index, cores, memory, _environment(python))
    wait_for_log(worker, "Successfully registered with master")
    return worker


def start_history(folder: str | Path, event_logs: str | Path) -> Server:
    """The Spark History Server over ``event_logs``, on 127.0.0.1, recorded in the folder's state like a cluster."""
    folder, events = Path(folder).resolve(), Path(event_logs).resolve()
    if not events.is_dir():
        raise ConfigError(f"no event logs at {events}: run a job with spark.event_log_dir set first")
    folder.mkdir(parents=True, exist_ok=True)
    state = ClusterState.load(folder)
    if any(s.role == "history" and _running(s) for s in state.servers):
        return state.server("history")
    state.servers = [s for s in state.servers if s.role != "history"]
    ui = free_port()
    env = _environment(None)
    env["SPARK_HISTORY_OPTS"] = (f"-Dspark.history.fs.logDirectory=file:{events} -Dspark.history.ui.port={ui} "
                                 "-Dspark.history.fs.update.interval=5s")
    server = _launch(state, "history", HISTORY_CLASS, [], ui, env)
    wait_for_log(server, "Bound HistoryServer")
    return server


def stop(folder: str | Path, roles: set[str] | None = None) -> list[Server]:
    """Stop the servers recorded in ``folder`` (or only those of ``roles``), workers before the master.

    SIGTERM, then SIGKILL after 20 s.  Returns the servers that were running.
    """
    state = ClusterState.load(folder)
    chosen = [s for s in state.servers if roles is None or s.role in roles]
    stopped = []
    for server in sorted(chosen, key=lambda s: s.main_class == MASTER_CLASS):
        if _running(server):
            stopped.append(server)
            _terminate(server.pid)
    state.servers = [s for s in state.servers if s not in chosen]
    if not any(s.main_class == MASTER_CLASS for s in state.servers):
        state.master_url = None
    state.save()
    return stopped


def kill(server: Server) -> None:
    """SIGKILL one server at once, as a crashed machine would stop it (fault tests)."""
    if _running(server):
        os.kill(server.pid, signal.SIGKILL)
        _reap(server.pid, 20)


def _terminate(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    if not _reap(pid, 20):
        os.kill(pid, signal.SIGKILL)
        _reap(pid, 10)


def _reap(pid: int, seconds: float) -> bool:
    """Wait for ``pid`` to end (collecting it if it is our child); True when it has."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return True
        except ChildProcessError:  # not our child (started by `make cluster-up`): poll for it
            if not _alive(pid):
                return True
        time.sleep(0.2)
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _running(server: Server) -> bool:
    """The pid is alive and still runs the server's class (not a pid reused by another program)."""
    try:
        command = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return _alive(server.pid) and server.main_class.encode() in command


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctlake.spark.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status", "url", "history", "history-down"])
    parser.add_argument("--folder", default=".cache/cluster", help="state, logs and work folders (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="workers to start (default: %(default)s)")
    parser.add_argument("--cores", type=int, default=1, help="cores per worker (default: %(default)s)")
    parser.add_argument("--memory", default="2g", help="memory per worker (default: %(default)s)")
    parser.add_argument("--events", default="data/spark-events", help="event log folder for history "
                                                                       "(default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            state = start(args.folder, args.workers, args.cores, args.memory)
            master = state.server("master")
            print(f"master {state.master_url} (web UI http://127.0.0.1:{master.web_ui_port}), "
                  f"{len(state.workers())} workers; logs in {state.folder}")
            print(f"submit with: make submit JOB=ingest MASTER={state.master_url}")
        elif args.command == "down":
            stopped = stop(args.folder, {s.role for s in ClusterState.load(args.folder).servers} - {"history"})
            print(f"stopped {', '.join(f'{s.role} (pid {s.pid})' for s in stopped) or 'nothing: no cluster running'}")
        elif args.command == "url":
            state = ClusterState.load(args.folder)
            if state.master_url is None or not _running(state.server("master")):
                raise ClusterError(f"no cluster running from {args.folder}: make cluster-up")
            print(state.master_url)
        elif args.command == "history":
            server = start_history(args.folder, args.events)
            print(f"history server http://127.0.0.1:{server.web_ui_port} over {Path(args.events).resolve()} "
                  f"(pid {server.pid}); stop with: make history-down")
        elif args.command == "history-down":
            stopped = stop(args.folder, {"history"})
            print(f"stopped {', '.join(f'history (pid {s.pid})' for s in stopped) or 'nothing: no history server'}")
        else:
            state = ClusterState.load(args.folder)
            for server in state.servers:
                print(f"{server.role:10} pid {server.pid:<8} {'running' if _running(server) else 'stopped'}  "
                      f"http://127.0.0.1:{server.web_ui_port}")
            if not state.servers:
                print("no servers recorded")
    except (ClusterError, ConfigError) as exc:
        print(f"cluster: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
