"""The collective weight transport: tensors between two processes over a torch.distributed
group made for one push.

The trainer (rank 0) hosts a ``torch.distributed.TCPStore`` on a socket it binds to the
rendezvous address (so it listens on that address only); each generation replica joins a
group of two under a prefix of that store (a random token it learns over the authenticated
gRPC control plane, so nobody who cannot call the replica can join in its place), and rank 0
broadcasts the tensors' bytes to it in buckets. Each replica has its own group: a replica that
fails cannot stall the others. PyTorch does the work — ``TCPStore``/``PrefixStore`` for the
rendezvous, ``ProcessGroupGloo`` (CPU tensors; ``ProcessGroupNCCL`` would carry CUDA tensors
the same way) for the transfer — with every wait bounded by the push's timeout.

The bytes are the tensors' raw little-endian bytes in the order of the header, one stream cut
into buckets of ``bucket_bytes``: a tensor may span buckets, and a bucket tensors.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

MIN_BUCKET_BYTES, MAX_BUCKET_BYTES = 1 << 10, 512 << 20
DEFAULT_BUCKET_BYTES = 256 << 20
DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S = 300.0, 3600.0


def new_group_name() -> str:
    """A random prefix for one replica's group in the trainer's store."""
    return secrets.token_hex(16)


class Rendezvous:
    """The trainer's store for one push, listening on ``host``:``port`` (0: a free port)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(128)
            self.host, self.port = host, self.socket.getsockname()[1]
            self.store = dist.TCPStore(
                host, self.port, is_master=True, wait_for_workers=False,
                timeout=timedelta(seconds=timeout), master_listen_fd=self.socket.fileno(),
            )  # fmt: skip
        except BaseException:
            self.socket.close()
            raise
        self.socket.detach()  # the store owns the listening socket now, and closes it

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def close(self) -> None:
        """Stops the store (once the groups made in it are gone)."""
        del self.store


def accept(store: dist.Store, name: str) -> None:
    """Replica: tells the trainer it accepted the push's header (so it joins next)."""
    dist.PrefixStore(name, store).set("accepted", "1")


def wait_accepted(store: dist.Store, name: str, refused, deadline: float) -> None:
    """Trainer: waits until the replica accepted, or ``refused()`` (its call ended) or the
    ``deadline`` (monotonic) passed: a refused header does not keep the trainer waiting."""
    prefixed = dist.PrefixStore(name, store)
    while not prefixed.check(["accepted"]):
        if refused():
            raise RuntimeError("the replica refused the push before joining")
        if time.monotonic() > deadline:
            raise TimeoutError("the replica did not join the push's group in time")
        time.sleep(0.01)


def join(store: dist.Store, name: str, rank: int, timeout: float) -> dist.ProcessGroup:
    """The group of two called ``name`` in ``store`` (blocks until both members joined)."""
    return dist.ProcessGroupGloo(dist.PrefixStore(name, store), rank, 2, timedelta(seconds=timeout))


def connect(host: str, port: int, timeout: float) -> dist.Store:
    """A replica's connection to the trainer's store."""
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout))


def _broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, timeout: float) -> None:
    options = dist.BroadcastOptions()
    options.rootRank, options.rootTensor = 0, 0
    group.broadcast([tensor], options).wait(timedelta(seconds=timeout))


def buckets(total: int, bucket_bytes: int) -> Iterator[tuple[int, int]]:
    """The [start, end) byte ranges of the stream's buckets."""
    for start in range(0, total, bucket_bytes):
        yield start, min(start + bucket_bytes, total)


def send(
    group: dist.ProcessGroup, tensors: Sequence[torch.Tensor], bucket_bytes: int, timeout: float
) -> int:
    """Rank 0: sends ``tensors``' bytes in order, bucket by bucket; returns the bytes sent."""
    flats = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    total = sum(f.numel() for f in flats)
    bucket = torch.empty(min(bucket_bytes, max(total, 1)), dtype=torch.uint8)
    pieces = iter(flats)
    current, used = next(pieces, None), 0  # the tensor being copied, and how much of it
    for start, end in buckets(total, bucket_bytes):
        filled = 0
        while filled < end - start:
            take = min(current.numel() - used, end - start - filled)
            bucket[filled : filled + take].copy_(current[used : used + take])
            filled, used = filled + take, used + take
            if used == current.numel():
                current, used = next(pieces, None), 0
        _broadcast(group, bucket[: end - start], timeout)
    return total


def receive(
    group: dist.ProcessGroup, buffers: Sequence[torch.Tensor], bucket_bytes: int, timeout: float
) -> int:
    """Rank 1: fills ``buffers`` (flat uint8 tensors, in the sender's order) from the stream;
    returns the bytes received."""
    total = sum(b.numel() for b in buffers)
    bucket = torch.empty(min(bucket_bytes, max(total, 1)), dtype=torch.uint8)
    pieces = iter(buffers)
    current, used = next(pieces, None), 0
    for start, end in buckets(total, bucket_bytes):
        _broadcast(group, bucket[: end - start], timeout)
        taken = 0
        while taken < end - start:
            take = min(current.numel() - used, end - start - taken)
            current[used : used + take].copy_(bucket[taken : taken + take])
            taken, used = taken + take, used + take
            if used == current.numel():
                current, used = next(pieces, None), 0
    return total
