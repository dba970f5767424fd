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

The bytes are the tensors' raw little-endian bytes in the order of the header (:func:`plan`):
a large tensor goes from the sender's memory straight into the receiver's, in slices of at
most ``bucket_bytes``; small tensors are copied together into buckets of at most that size.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Sequence
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


COALESCE_BYTES = 1 << 20
"""Tensors smaller than this travel together in a copied bucket; larger ones are sent from
(and received into) their own memory, in slices of at most ``bucket_bytes``."""


def plan(sizes: Sequence[int], bucket_bytes: int) -> list[list[tuple[int, int, int]]]:
    """The transfers of the stream: each a list of (tensor, start, end) byte ranges sent as
    one broadcast. Both sides derive the same plan from the header's sizes."""
    transfers, pending, pending_bytes = [], [], 0
    for index, size in enumerate(sizes):
        if size >= COALESCE_BYTES:
            for begin in range(0, size, bucket_bytes):
                transfers.append([(index, begin, min(begin + bucket_bytes, size))])
            continue
        if pending and pending_bytes + size > bucket_bytes:
            transfers.append(pending)
            pending, pending_bytes = [], 0
        if size:
            pending.append((index, 0, size))
            pending_bytes += size
    if pending:
        transfers.append(pending)
    return transfers


def _run(group, flats: Sequence[torch.Tensor], bucket_bytes: int, timeout: float, root: bool):
    bucket = None
    for transfer in plan([f.numel() for f in flats], bucket_bytes):
        if len(transfer) == 1:  # one tensor's memory: no copy
            index, begin, end = transfer[0]
            _broadcast(group, flats[index][begin:end], timeout)
            continue
        total = sum(end - begin for _, begin, end in transfer)
        if bucket is None or bucket.numel() < total:
            bucket = torch.empty(total, dtype=torch.uint8)
        offset = 0
        if root:
            for index, begin, end in transfer:
                bucket[offset : offset + end - begin].copy_(flats[index][begin:end])
                offset += end - begin
        _broadcast(group, bucket[:total], timeout)
        if not root:
            for index, begin, end in transfer:
                flats[index][begin:end].copy_(bucket[offset : offset + end - begin])
                offset += end - begin
    return sum(f.numel() for f in flats)


def send(
    group: dist.ProcessGroup, tensors: Sequence[torch.Tensor], bucket_bytes: int, timeout: float
) -> int:
    """Rank 0: sends ``tensors``' bytes in order (:func:`plan`); returns the bytes sent."""
    flats = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    return _run(group, flats, bucket_bytes, timeout, root=True)


def receive(
    group: dist.ProcessGroup, buffers: Sequence[torch.Tensor], bucket_bytes: int, timeout: float
) -> int:
    """Rank 1: fills ``buffers`` (flat uint8 tensors, in the sender's order) from the stream;
    returns the bytes received."""
    return _run(group, list(buffers), bucket_bytes, timeout, root=False)
