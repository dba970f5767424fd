"""Finding the generation replicas by DNS: the records of a headless Service are its ready
pods. (Kubernetes' EndpointSlices are read by :func:`alignd.kube.discover`.)"""

from __future__ import annotations

import socket

from alignd.platform.config import PlatformConfigError


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (A and AAAA records)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0].split("%")[0] for info in infos]


def replicas(address: str, resolve) -> list[str]:
    """``ip:port`` of every address the host of ``address`` (``HOST:PORT``) resolves to now,
    in order (IPv6 in brackets).

    Raises:
        PlatformConfigError: it resolves to nothing.
    """
    host, _, port = address.rpartition(":")
    try:
        addresses = sorted(set(resolve(host, int(port))))
    except (OSError, ValueError) as err:
        raise PlatformConfigError(f"generation_dns {address!r}: {err}") from None
    if not addresses:
        raise PlatformConfigError(f"generation_dns {address!r} has no records")
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]
