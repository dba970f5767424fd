"""The local platform: the four services as child processes on 127.0.0.1, recorded in a state
file (``<dir>/platform.json``) from which ``alignd status``/``alignd down`` and
``Platform.from_state`` find them. Starting, waiting and stopping are :mod:`alignd.local`'s."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from alignd import settings
from alignd.local import LocalService, free_port, stop_all, wait_serving
from alignd.models import resolve_model
from alignd.platform.config import ROLES, PlatformState, ProcessRecord, load

log = logging.getLogger(__name__)

STATE_FILE = "platform.json"
DEFAULT_MODELS = {
    "generation": "smollm2-135m",
    "reward": "minilm-l6",
    "reference": "smollm2-135m",
    "trainer": "smollm2-135m",
}
"""The model each service of a local platform serves unless told otherwise."""


def default_directory(home: Path | str | None = None) -> Path:
    """Where a local platform keeps its state file and logs: ``<ALIGND_HOME>/platform``."""
    return (settings.home() if home is None else Path(home).expanduser()) / "platform"


def state_path(directory: Path | str) -> Path:
    """The state file of a local platform given its directory (or the file itself)."""
    path = Path(directory)
    return path if path.suffix == ".json" else path / STATE_FILE


def start_local(
    directory: Path,
    *,
    roles: Sequence[str],
    models: Mapping[str, str | Path],
    extra_args: Mapping[str, Sequence[str]],
    home: Path | str | None,
    token_file: Path | str | None,
    storage_roots: Sequence[Path | str],
    detach: bool,
    ready_timeout: float,
    stop_timeout: float,
) -> list[LocalService]:
    """Starts the services (see ``Platform.local`` for the arguments), waits until all serve
    and writes the state file; returns the services (stopped again if any fails)."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown roles {unknown}; choose from {', '.join(ROLES)}")
    refuse_if_running(directory)
    chosen = {role: models.get(role, DEFAULT_MODELS[role]) for role in roles}
    resolved = {role: str(resolve_model(model, home)) for role, model in chosen.items()}
    logs = directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    roots = [str(Path(r).resolve()) for r in storage_roots]
    services = {
        role: LocalService(
            role,
            log_file=logs / f"{role}.log",
            model=model,
            metrics_port=free_port(),
            stop_timeout=stop_timeout,
        )
        for role, model in resolved.items()
    }
    try:
        for role, service in services.items():
            flags = ["--auth-token-file", str(token_file)] if token_file else []
            if role in ("generation", "trainer"):
                flags += [arg for root in roots for arg in ("--storage-root", root)]
            if role == "trainer" and "generation" in services:
                flags += ["--push-targets", services["generation"].target]
            service.args = [*flags, *extra_args.get(role, ())]
            service.launch(detach)  # each in its own session when detached
        wait_serving(services, ready_timeout)
        records = {role: _record(s) for role, s in services.items()}
        state = PlatformState(
            services={role: s.target for role, s in services.items()}, token_file=token_file,
            processes=records, started_at=time.time(),
        )  # fmt: skip
        _write_state(state_path(directory), state)
    except BaseException:
        stop_all(services.values())
        raise
    return list(services.values())


def _record(service: LocalService) -> ProcessRecord:
    return ProcessRecord(
        pid=service.process.pid, target=service.target, metrics_port=service.metrics_port,
        model=service.model, log=service.log_file,
    )  # fmt: skip


def _write_state(path: Path, state: PlatformState) -> None:
    """Writes the state file atomically (a temporary sibling, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(state.model_dump_json(indent=2, exclude_none=True) + "\n")
    os.replace(tmp, path)


def _alive(pid: int, role: str) -> bool:
    """Whether ``pid`` is still the ``role`` service (not exited, a zombie, or a reused pid)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if not Path("/proc/self").exists():  # no procfs: trust the pid
        return True
    try:
        return f"alignd_server.{role}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def refuse_if_running(directory: Path) -> None:
    path = state_path(directory)
    if not path.is_file():
        return
    state = load(PlatformState, path)
    running = [role for role, p in state.processes.items() if _alive(p.pid, role)]
    if running:
        raise RuntimeError(
            f"a platform already runs from {directory} ({', '.join(running)}); "
            f"stop it first: alignd down --dir {directory}"
        )


def stop_local(directory: Path | str, timeout: float = 30.0) -> dict[str, str]:
    """Stops the processes a local platform's state file lists and removes the file.

    Each gets SIGTERM (a graceful shutdown); those still running after ``timeout`` seconds get
    SIGKILL, with their process group when they lead one (``detach``).

    Returns:
        Per role: ``stopped``, ``killed`` or ``not running``.

    Raises:
        FileNotFoundError: there is no state file.
    """
    path = state_path(directory)
    if not path.is_file():
        raise FileNotFoundError(f"no local platform in {path.parent} ({path} is missing)")
    state = load(PlatformState, path)
    outcome = {role: "not running" for role in state.processes}
    live = {role: p.pid for role, p in state.processes.items() if _alive(p.pid, role)}
    for role, pid in live.items():
        os.kill(pid, signal.SIGTERM)
        outcome[role] = "stopped"
    live = _wait_gone(live, timeout)
    for role, pid in live.items():
        log.warning("%s (pid %d) did not stop in %.0fs; killing it", role, pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        outcome[role] = "killed"
    _wait_gone(live, 10.0)
    path.unlink()
    return outcome


def _wait_gone(pids: Mapping[str, int], timeout: float) -> dict[str, int]:
    """Polls until the processes exit or ``timeout`` passes; returns those still running."""
    deadline = time.monotonic() + timeout
    live = {role: pid for role, pid in pids.items() if _alive(pid, role)}
    while live and time.monotonic() < deadline:
        time.sleep(0.1)
        live = {role: pid for role, pid in live.items() if _alive(pid, role)}
    return live
