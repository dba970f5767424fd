"""Services as local child processes, on loopback (tests, the demo, the local platform)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
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
        args: extra ``alignd serve`` flags, e.g. ``["--model", path]``.
        log_file: where the service's output goes (default: inherited stderr).
        env: extra environment variables.
    """

    def __init__(
        self,
        role: str,
        args: list[str] | None = None,
        *,
        log_file: Path | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        stop_timeout: float = 30.0,
    ) -> None:
        if role not in CLIENTS:
            raise ValueError(f"unknown role {role!r}; choose from {', '.join(CLIENTS)}")
        self.role = role
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
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
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Polls health until SERVING; fails at once if the process exits."""
        where = f"; see {self.log_file}" if self.log_file else ""
        deadline = time.monotonic() + timeout
        with self.client(timeout=10, retries=1) as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code is not None:
                    raise RuntimeError(f"{self.role} service exited with code {code}{where}")
                try:
                    if client.health(timeout=1.0) == "SERVING":
                        return
                except AligndError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"{self.role} service not ready after {timeout:.0f}s{where}")

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
