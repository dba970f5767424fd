"""Services as local child processes, on loopback (tests, the demo, the local platform): the
one supervisor of alignd's processes — start, wait until they serve, stop (SIGTERM, then
SIGKILL) — used for one service (:class:`LocalService`) and for several at once
(:func:`wait_serving`, :func:`stop_all`, what ``Platform.local`` runs)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from alignd.clients import GenerationClient, ReferenceClient, RewardClient, TrainerClient
from alignd.clients.base import ClientBase
from alignd.errors import AligndError

log = logging.getLogger(__name__)

CLIENTS: dict[str, type[ClientBase]] = {
    "generation": GenerationClient,
    "reward": RewardClient,
    "reference": ReferenceClient,
    "trainer": TrainerClient,
}


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS may hand it out again; bind soon)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalService:
    """One service running as ``python -m alignd_server.ROLE`` on 127.0.0.1.

    Use as a context manager: the process is started on enter, waited for until SERVING, and
    stopped (SIGTERM, then SIGKILL after ``stop_timeout``) on exit.

    Args:
        role: ``generation``, ``reward``, ``reference`` or ``trainer``.
        args: more ``alignd serve`` flags, e.g. ``["--max-batch-size", "8"]``.
        log_file: where the service's output goes (default: inherited stderr).
        env: extra environment variables.
        port: its gRPC port (default: a free one).
        model: the model it serves (``--model``); None = the flags' or the service's default.
        metrics_port: its Prometheus port (``--metrics-port``); None = the flags' or default.
        stop_timeout: seconds between SIGTERM and SIGKILL in :meth:`stop`.
    """

    def __init__(
        self,
        role: str,
        args: list[str] | None = None,
        *,
        log_file: Path | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        model: str | None = None,
        metrics_port: int | None = None,
        stop_timeout: float = 30.0,
    ) -> None:
        if role not in CLIENTS:
            raise ValueError(f"unknown role {role!r}; choose from {', '.join(CLIENTS)}")
        self.role = role
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.model = model
        self.metrics_port = metrics_port
        self.args = list(args or [])
        self.log_file = log_file
        self.env = env or {}
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen | None = None

    def launch(self, detach: bool = False) -> None:
        """Starts the process without waiting for it to serve.

        Args:
            detach: give it its own session (and process group), so it outlives this process
                and a Ctrl-C here does not reach it.
        """
        cmd = [
            sys.executable,
            "-m",
            f"alignd_server.{self.role}",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *(["--model", self.model] if self.model is not None else []),
            *(["--metrics-port", str(self.metrics_port)] if self.metrics_port is not None else []),
            *self.args,
        ]
        out = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL if detach else None, stdout=out,
                stderr=subprocess.STDOUT if out else None, env={**os.environ, **self.env},
                start_new_session=detach,
            )  # fmt: skip
        finally:
            if out:
                out.close()
        log.info("started %s (pid %d) on %s", self.role, self.process.pid, self.target)

    def start(self, ready_timeout: float = 180.0) -> None:
        """Starts the process and waits until the service reports SERVING."""
        self.launch()
        try:
            wait_serving({self.role: self}, ready_timeout)
        except BaseException:
            self.stop()
            raise

    def client(self, **kwargs) -> ClientBase:
        """A new client of this service (close it, or use ``with``)."""
        return CLIENTS[self.role](self.target, **kwargs)

    def stop(self) -> int | None:
        """SIGTERM, wait up to ``stop_timeout``, then SIGKILL; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.role, self.stop_timeout)
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> LocalService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_serving(services: Mapping[str, LocalService], timeout: float) -> None:
    """Polls every service's health until all report SERVING; fails as soon as one exits.

    Raises:
        RuntimeError: a service exited (its code and log file named).
        TimeoutError: not every one served within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    clients = {role: s.client(timeout=10, retries=1) for role, s in services.items()}
    pending = dict(services)
    try:
        while pending:
            for role, service in list(pending.items()):
                code = service.process.poll()
                if code is not None:
                    where = f"; see {service.log_file}" if service.log_file else ""
                    raise RuntimeError(f"{role} service exited with code {code}{where}")
                with contextlib.suppress(AligndError):
                    if clients[role].health(timeout=1.0) == "SERVING":
                        del pending[role]
            if pending and time.monotonic() > deadline:
                logs = ", ".join(str(s.log_file) for s in pending.values() if s.log_file)
                raise TimeoutError(
                    f"not SERVING after {timeout:.0f}s: {', '.join(pending)}"
                    + (f"; see {logs}" if logs else "")
                )
            if pending:
                time.sleep(0.1)
    finally:
        for client in clients.values():
            client.close()


def stop_all(services: Iterable[LocalService]) -> None:
    """SIGTERM to every process at once, then each waited for (SIGKILL after its timeout)."""
    services = [s for s in services if s.process is not None]
    for service in services:
        if service.process.poll() is None:
            service.process.terminate()
    for service in services:
        service.stop()
