"""PushWeights: the trainer's current weights to generation services, concurrently.

Over the network the weights travel as the UpdateWeights stream (4 MiB chunks); with
``shared_path`` they are written once as safetensors on a volume the targets mount, and each
target loads them with LoadWeights; with ``rendezvous`` (the collective transport,
:mod:`alignd_server.common.collective`) the trainer hosts a store there and sends each target
the weights over a torch.distributed group of two, while the target's ReceiveWeights call
carries the header, version and outcome. Each target has its own deadline and its own
result: one slow or dead replica does not fail the others. A value head, if any, is not
pushed (generation holds only the policy).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from alignd import AsyncGenerationClient, TLSConfig
from alignd.errors import AligndError
from alignd.v1 import common_pb2, generation_pb2, trainer_pb2
from alignd_server.common import collective
from alignd_server.common.errors import FailedPrecondition, InvalidArgument
from alignd_server.trainer.config import TrainerSettings

log = logging.getLogger(__name__)


def policy_weights(engine) -> dict[str, np.ndarray]:
    """The policy's parameters as float32 numpy arrays, by name (tied weights once; LoRA
    adapters merged). Under FSDP every rank calls it (the weights are gathered tensor by
    tensor); only rank 0 gets them."""
    keep = not engine.sharded or torch.distributed.get_rank() == 0
    return {n: p.float().cpu().numpy() for n, p in engine.full_weights(keep).items()}


def _client(address: str, settings: TrainerSettings) -> AsyncGenerationClient:
    token = None
    if settings.push_token_file is not None:
        token = settings.push_token_file.read_text().splitlines()[0].strip()
    tls = None
    if settings.push_tls_ca or settings.push_tls_cert:
        tls = TLSConfig(ca_cert=settings.push_tls_ca, client_cert=settings.push_tls_cert,
                        client_key=settings.push_tls_key)  # fmt: skip
    return AsyncGenerationClient(address, token=token, tls=tls, retries=1)


async def _push_one(
    address: str, weights, version: int, timeout: float, shared: Path | None, settings
) -> trainer_pb2.PushResult:
    start = time.perf_counter()
    size = sum(w.nbytes for w in weights.values())
    try:
        async with _client(address, settings) as client:
            if shared is None:
                await client.update_weights(weights, version, timeout=timeout)
            else:
                await client.load_weights(str(shared), version, timeout=timeout)
        return trainer_pb2.PushResult(
            address=address, ok=True, seconds=time.perf_counter() - start, bytes=size
        )
    except AligndError as err:
        return trainer_pb2.PushResult(
            address=address, ok=False, error=f"{err.code.name}: {err.details}",
            seconds=time.perf_counter() - start,
        )  # fmt: skip


async def _push_collective(
    address: str,
    weights,
    version: int,
    timeout: float,
    rendezvous,
    bucket: int,
    settings,
    senders: concurrent.futures.Executor,
) -> trainer_pb2.PushResult:
    start, deadline = time.perf_counter(), time.monotonic() + timeout
    name, called = collective.new_group_name(), threading.Event()
    header = generation_pb2.WeightsHeader(version=version, tensors=[
        generation_pb2.TensorSpec(name=n, dtype=common_pb2.DTYPE_FLOAT32, shape=w.shape)
        for n, w in weights.items()])  # fmt: skip
    request = generation_pb2.ReceiveWeightsRequest(
        header=header, rendezvous=rendezvous.address, group=name, bucket_bytes=bucket,
        timeout_seconds=timeout,
    )  # fmt: skip

    def send() -> int:
        collective.wait_accepted(rendezvous.store, name, called.is_set, deadline)
        remaining = max(deadline - time.monotonic(), 1e-3)
        joining = time.perf_counter()
        group = collective.join(rendezvous.store, name, 0, remaining)
        tensors = [torch.from_numpy(w) for w in weights.values()]
        sending = time.perf_counter()
        size = collective.send(group, tensors, bucket, remaining)
        seconds = time.perf_counter() - sending
        log.info("collective push to %s: accepted after %.3f s, joined in %.3f s, %d bytes "
                 "sent in %.3f s (%.2f GB/s)", address, joining - start, sending - joining,
                 size, seconds, size / max(seconds, 1e-9) / 1e9)  # fmt: skip
        return size

    sending = asyncio.get_running_loop().run_in_executor(senders, send)
    try:
        async with _client(address, settings) as client:
            try:
                await client.receive_weights(request, timeout=timeout)
            finally:
                called.set()
        size = await sending
        return trainer_pb2.PushResult(
            address=address, ok=True, seconds=time.perf_counter() - start, bytes=size
        )
    except AligndError as err:
        # The sending thread ends by itself: its peer is gone, or its waits time out.
        sending.add_done_callback(lambda done: done.exception())
        return trainer_pb2.PushResult(
            address=address, ok=False, error=f"{err.code.name}: {err.details}",
            seconds=time.perf_counter() - start,
        )  # fmt: skip
    except (RuntimeError, OSError, TimeoutError) as err:  # the trainer's side of the group
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        return trainer_pb2.PushResult(
            address=address, ok=False, error=f"UNAVAILABLE: the collective transfer failed: "
            f"{detail}", seconds=time.perf_counter() - start,
        )  # fmt: skip


async def push_collective(
    weights: dict[str, np.ndarray], addresses: list[str], version: int, timeout: float,
    listen: tuple[str, int], bucket: int, settings: TrainerSettings,
) -> list[trainer_pb2.PushResult]:  # fmt: skip
    """Pushes ``weights`` to every address over the collective transport, the trainer's store
    listening on ``listen``; one result per address, in order.

    Raises:
        FailedPrecondition: the trainer cannot listen on ``listen``.
    """
    try:
        rendezvous = collective.Rendezvous(*listen, timeout)
    except (OSError, RuntimeError) as err:
        raise FailedPrecondition(f"rendezvous: cannot listen on {listen[0]}:{listen[1]}: "
                                 f"{err}") from None  # fmt: skip
    # A sender per target: each waits on its own replica, so none may queue behind another.
    senders = concurrent.futures.ThreadPoolExecutor(len(addresses), "collective-push")
    try:
        return list(await asyncio.gather(*(
            _push_collective(a, weights, version, timeout, rendezvous, bucket, settings, senders)
            for a in addresses)))  # fmt: skip
    finally:
        senders.shutdown(wait=False)  # a sender still waiting ends within the timeout
        rendezvous.close()


async def push(
    weights: dict[str, np.ndarray],
    addresses: list[str],
    version: int,
    timeout: float,
    shared: Path | None,
    settings: TrainerSettings,
) -> list[trainer_pb2.PushResult]:
    """Pushes ``weights`` to every address concurrently; one result per address, in order.

    With ``shared`` (a directory inside the storage roots), the weights are written once to
    ``shared/v<version>`` and each target loads them from there.

    Raises:
        InvalidArgument: ``shared`` cannot hold a directory (a file is in the way).
        FailedPrecondition: the weights could not be written there.
    """
    directory = None
    if shared is not None:
        directory = shared / f"v{version}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InvalidArgument("shared_path", f"cannot make {directory}: {err}") from None
        if directory.is_symlink():  # it must not lead outside the storage roots
            raise InvalidArgument("shared_path", f"{directory} is a symlink")
        file = directory / "model.safetensors"
        if file.is_symlink():
            file.unlink()
        try:
            await asyncio.to_thread(save_file, weights, str(file))
        except OSError as err:
            raise FailedPrecondition(f"shared_path: cannot write {file}: {err}") from None
    return list(
        await asyncio.gather(
            *(_push_one(a, weights, version, timeout, directory, settings) for a in addresses)
        )
    )
