"""Which generation services PushWeights may connect to (``--push-targets``).

The trainer presents its push credentials (bearer token, client certificate) to every target
it pushes to, so an address named in a request is contacted only when the operator allowed it:
listed as ``HOST:PORT``, or an IP address that a listed DNS name resolves to at the time of the
push (the records of a headless Service are its pods, so a fleet that scales stays allowed).
Names are resolved again on every push, through the system resolver, with a bounded wait.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Sequence

from alignd_server.common.errors import InvalidArgument

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_S = 10.0


def split_address(address: str, *, free_port: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host in lower case, port).

    Raises:
        ValueError: no port, a port outside 1..65535 (0..65535 with ``free_port``: an address
            to listen on), an empty host, or a target with a scheme (``dns:///``, ``unix:``),
            which pushes do not take.
    """
    if "/" in address or any(c.isspace() for c in address):
        raise ValueError(f"{address!r} must be HOST:PORT (no scheme, path or spaces)")
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 address as [ADDRESS]:PORT")
    lowest = 0 if free_port else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) <= 65535:
        raise ValueError(f"{address!r} must be HOST:PORT with a port in {lowest}..65535")
    return host.lower(), int(port)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class PushTargets:
    """The allowed push targets.

    Args:
        entries: ``HOST:PORT`` strings (validated by the settings).
    """

    def __init__(self, entries: Sequence[str]) -> None:
        self.entries = [split_address(e) for e in entries]

    def describe(self) -> str:
        return ", ".join(f"{h}:{p}" for h, p in self.entries) or "none"

    async def _resolved(self, port: int) -> set:
        """IP addresses of the listed names with ``port``, resolved now."""
        loop = asyncio.get_running_loop()
        addresses = set()
        for host, listed_port in self.entries:
            if listed_port != port or _ip(host) is not None:
                continue
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
                )
            except (OSError, TimeoutError) as err:
                log.warning("push target %s:%d does not resolve: %s", host, port, err)
                continue
            addresses.update(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos)
        return addresses

    async def check(self, addresses: Sequence[str], field: str = "targets") -> None:
        """Raises InvalidArgument naming ``targets[i].address`` for the first address that is
        malformed or not allowed."""
        for i, address in enumerate(addresses):
            name = f"{field}[{i}].address"
            if not address:
                raise InvalidArgument(name, "must be set")
            try:
                host, port = split_address(address)
            except ValueError as err:
                raise InvalidArgument(name, str(err)) from None
            if (host, port) in self.entries:
                continue
            ip = _ip(host)
            if ip is not None and any(ip == _ip(h) for h, p in self.entries if p == port):
                continue
            if ip is not None and ip in await self._resolved(port):
                continue
            raise InvalidArgument(
                name,
                f"{address!r} is not an allowed push target (the trainer's --push-targets: "
                f"{self.describe()})",
            )
