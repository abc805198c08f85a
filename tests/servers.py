"""Real servers for the tests: a local Ray cluster (`ray start --head`) and an MLflow tracking server
(`mlflow server`, SQLite backend store), each on free ports of 127.0.0.1, each in a process group of its
own that is stopped, every process in it, however the test ends."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

START_SECONDS = 180  # both start in 10-40 s on 2 busy cores
# the servers' own environment: no telemetry sent from a machine that may have no network (MLflow
# otherwise waits for it at exit), no MLflow job runner (a pool of worker processes the tests never use);
# a Ray cluster on 127.0.0.1 without token authentication (Ray turns it on when ~/.ray/auth_token exists,
# and a driver then needs RAY_AUTH_MODE=token too), in Ray's processes and the test's drivers alike
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
         "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(pgid: int, grace: float = 5.0) -> None:
    """SIGTERM to process group `pgid`, SIGKILL to what is left of it after `grace` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


@contextmanager
def mlflow_server(root: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow server` with its backend store in ROOT/mlflow.db and artifacts in ROOT/artifacts; yields
    its tracking URI and process (whose process group the context stops)."""
    root.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), (root / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **QUIET})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        while not _answers(uri + "/health"):
            assert process.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield uri, process
    finally:
        stop_group(process.pid)
        process.wait()
        log.close()


@contextmanager
def ray_cluster(cpus: int = 2) -> Iterator[str]:
    """A Ray head node on 127.0.0.1 with `cpus` CPUs and no GPU, its files in a temporary directory of its
    own (short: Ray's socket paths must fit in 107 bytes); yields its address HOST:PORT."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
               "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(cpus),
               "--num-gpus", "0", "--temp-dir", str(temp), "--include-dashboard", "false",
               "--disable-usage-stats", "--ray-client-server-port", str(free_port()),
               "--dashboard-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
    # `ray start` returns once the node is up; its processes stay in the process group it leads
    starter = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, env={**os.environ, **QUIET})
    try:
        output, _ = starter.communicate(timeout=START_SECONDS)
        assert starter.returncode == 0, output.decode()[-3000:]
        yield f"127.0.0.1:{port}"
    finally:
        if starter.poll() is None:
            starter.kill()
        stop_group(starter.pid)
        shutil.rmtree(temp, ignore_errors=True)
