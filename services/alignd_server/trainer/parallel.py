"""Data parallelism: N ranks under ``torch.distributed``, driven by rank 0's gRPC server.

``alignd serve trainer --nproc N`` starts N ranks with torchrun (gloo on CPU, NCCL on GPU).
Rank 0 serves gRPC; every other rank runs :func:`worker_loop`. For each primitive rank 0
broadcasts a command (a JSON header and, for batches, a safetensors blob: no pickle), and
every rank runs the same code on its shard. How the model itself is spread is PyTorch's
work (``--parallel``, see :mod:`.engine`): DDP keeps a replica per rank and all-reduces
gradients during the backward; FSDP2 shards parameters, gradients and optimizer state.

* ``ForwardBackward``: rows (pairs, for pairwise losses; KTO's KL rows go to every rank, so
  its reference point is the whole batch's) are split into N contiguous shards. Each rank
  weights its loss by its share of the loss's units (tokens, pairs or sequences), so the
  ranks' summed gradients are exactly the gradient of the whole batch's loss, and the
  reported loss and metrics are the unit-weighted means over ranks (``…/max`` metrics: the
  maximum). A rank whose shard is empty still runs the forward and backward, on rank 0's
  rows with weight 0, because DDP's and FSDP's collectives need every rank.
* ``OptimStep``: the gradients are already reduced; every rank clips (by the global norm)
  and steps, so DDP replicas stay equal and FSDP shards stay consistent.
* ``Forward``: rows are split; the outputs are gathered on rank 0.
* ``LoadCheckpoint``: every rank reads and checks the checkpoint (a volume all nodes mount);
  it is applied only when every rank could. ``SaveCheckpoint`` and ``PushWeights`` run on
  rank 0 alone under DDP; under FSDP every rank takes part (each writes its shards of the
  training state; the full weights are gathered tensor by tensor onto rank 0).
* ``Initialize``: each rank builds the new engine and keeps its old one unless every rank
  succeeded.

A rank that fails a command tells the others through a status all-reduce, so an error never
leaves the group waiting in a collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from alignd_server.common.errors import (
    AligndError,
    InvalidArgument,
    ResourceExhausted,
)
from alignd_server.common.models import LoadedModel, use_deterministic_algorithms
from alignd_server.common.server import configure_logging
from alignd_server.trainer import checkpoint, push, restore
from alignd_server.trainer.config import (
    RankEnvironment,
    TrainerSettings,
    settings_environment,
)
from alignd_server.trainer.engine import Batch, InitSpec, TrainerEngine, load_model
from alignd_server.trainer.lora import LoraSpec
from alignd_server.trainer.losses import SPECS, LossOutput

log = logging.getLogger(__name__)
MAX_METRICS = 64


class LocalExecutor:
    """One process: the primitives call the engine directly."""

    world_size, backend, parallel = 1, "", "none"

    def __init__(self, settings: TrainerSettings) -> None:
        self.device = settings.device

    def start(self) -> None:
        """Nothing to join."""

    def initialize(self, spec: InitSpec) -> TrainerEngine:
        engine = build_engine(spec, self.device, "none")
        engine.rank_bytes = ([engine.parameter_bytes()], [0])
        return engine

    def forward_backward(self, engine, batch, loss, params, scale, temperature, defer_sync):
        return engine.forward_backward(batch, loss, params, scale, temperature, defer_sync)

    def optim_step(self, engine: TrainerEngine):
        result = engine.optim_step()
        engine.rank_bytes = ([engine.parameter_bytes()], [engine.optimizer_bytes()])
        return result

    def save(self, engine: TrainerEngine, path: Path, include_optimizer: bool) -> int:
        return checkpoint.save(engine, path, include_optimizer)

    def policy_weights(self, engine: TrainerEngine) -> dict[str, np.ndarray]:
        return push.policy_weights(engine)

    def forward(self, engine, batch, outputs, temperature):
        return engine.forward(batch, outputs, temperature)

    def load(self, engine: TrainerEngine, path: str, load_optimizer: bool) -> int:
        return restore.load(engine, path, load_optimizer)

    def ping(self) -> None:
        """Nothing to keep alive."""

    def close(self) -> None:
        """Nothing to release."""


class Group:
    """This process's place in the torch.distributed group, and the command channel."""

    def __init__(self, settings: TrainerSettings, env: RankEnvironment) -> None:
        self.rank, self.world_size = env.rank, env.world_size
        cuda = settings.device.startswith("cuda")
        self.device = f"cuda:{env.local_rank}" if cuda else settings.device
        backend = settings.dist_backend
        self.backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
        self.timeout = timedelta(seconds=settings.dist_timeout_s)

    def join(self) -> None:
        """Blocks until every rank has joined (torchrun's rendezvous variables)."""
        if self.device.startswith("cuda"):
            torch.cuda.set_device(self.device)
        dist.init_process_group(self.backend, timeout=self.timeout)
        log.info("rank %d of %d joined (%s)", self.rank, self.world_size, self.backend)

    def to_device(self, data: torch.Tensor) -> torch.Tensor:
        return data.to(self.device) if self.backend == "nccl" else data

    def send(self, op: str, header: dict | None = None, blob: bytes = b"") -> None:
        """Rank 0: broadcasts a command to every rank."""
        text = json.dumps({"op": op, **(header or {})}).encode()
        sizes = self.to_device(torch.tensor([len(text), len(blob)], dtype=torch.int64))
        dist.broadcast(sizes, src=0)
        payload = np.frombuffer(text + blob, dtype=np.uint8).copy()
        dist.broadcast(self.to_device(torch.from_numpy(payload)), src=0)

    def receive(self) -> tuple[dict, bytes]:
        """Other ranks: waits for rank 0's next command."""
        sizes = self.to_device(torch.zeros(2, dtype=torch.int64))
        dist.broadcast(sizes, src=0)
        text_size, blob_size = (int(v) for v in sizes.cpu())
        payload = self.to_device(torch.zeros(text_size + blob_size, dtype=torch.uint8))
        dist.broadcast(payload, src=0)
        data = payload.cpu().numpy().tobytes()
        return json.loads(data[:text_size]), data[text_size:]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks."""
        tensor = self.to_device(torch.tensor(values, dtype=torch.float64))
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks."""
        tensor = self.to_device(torch.tensor(values, dtype=torch.float64))
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.cpu().tolist()

    def agree(self, error: AligndError | None) -> None:
        """Raises on every rank if any rank failed (rank 0 raises its own error if it has one)."""
        failed = self.sum([1.0 if error is not None else 0.0])[0]
        if error is not None:
            raise error
        if failed:
            raise InvalidArgument("batch", f"{int(failed)} other rank(s) rejected their shard")

    def gather(self, value: float) -> list[float]:
        """Every rank's ``value``, by rank."""
        values = [0.0] * self.world_size
        values[self.rank] = value
        return self.sum(values)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class ParallelExecutor:
    """Rank 0's side: broadcasts each primitive, then runs its own share of it."""

    def __init__(self, settings: TrainerSettings, env: RankEnvironment) -> None:
        self.group = Group(settings, env)
        self.world_size, self.backend = env.world_size, self.group.backend
        self.parallel = settings.parallel

    def start(self) -> None:
        self.group.join()

    def initialize(self, spec: InitSpec) -> TrainerEngine:
        self.group.send("initialize", {"spec": dataclasses.asdict(spec), "parallel": self.parallel})
        return _initialize(self.group, spec, self.parallel)

    def forward_backward(self, engine, batch, loss, params, scale, temperature, defer_sync):
        header = {"loss": loss, "params": params, "scale": scale, "temperature": temperature,
                  "defer_sync": defer_sync}  # fmt: skip
        self.group.send("forward_backward", header, encode_batch(batch))
        return _forward_backward(
            self.group, engine, batch, loss, params, scale, temperature, defer_sync
        )

    def optim_step(self, engine: TrainerEngine):
        engine.check_step()  # before the command: every rank would fail the same way
        self.group.send("optim_step")
        return _optim_step(self.group, engine)

    def save(self, engine: TrainerEngine, path: Path, include_optimizer: bool) -> int:
        if not engine.sharded:
            return checkpoint.save(engine, path, include_optimizer)
        temporary = checkpoint.prepare(path)
        self.group.send("save", {"temporary": str(temporary), "include": include_optimizer})
        return _save(self.group, engine, temporary, include_optimizer, final=path)

    def policy_weights(self, engine: TrainerEngine) -> dict[str, np.ndarray]:
        if engine.sharded:
            self.group.send("gather")
        return push.policy_weights(engine)

    def forward(self, engine, batch, outputs, temperature):
        header = {"outputs": sorted(outputs), "temperature": temperature}
        self.group.send("forward", header, encode_batch(batch))
        return _forward(self.group, engine, batch, set(outputs), temperature)

    def load(self, engine: TrainerEngine, path: str, load_optimizer: bool) -> int:
        self.group.send("load", {"path": path, "load_optimizer": load_optimizer})
        return _load(self.group, engine, path, load_optimizer)

    def ping(self) -> None:
        """Keeps idle ranks' waits shorter than the collective timeout."""
        self.group.send("ping")

    def close(self) -> None:
        if dist.is_initialized():
            self.group.send("shutdown")
        self.group.close()


def launch(settings: TrainerSettings) -> int | None:
    """Starts the ranks when ``settings`` asks for more than one.

    Returns ``None`` when this process should serve gRPC (one rank, or rank 0 under torchrun),
    else this rank's exit code. Outside torchrun with ``nproc``/``nnodes`` > 1, replaces this
    process with torchrun (so signals sent to this pid reach torchrun, which passes them on);
    every rank gets the resolved settings as ``ALIGND_*`` variables.
    """
    env = RankEnvironment()
    if env.torchelastic_run_id is None and settings.nproc * settings.nnodes > 1:
        os.environ.update(settings_environment(settings))
        os.execv(sys.executable, [
            sys.executable, "-m", "torch.distributed.run",
            f"--nproc-per-node={settings.nproc}", f"--nnodes={settings.nnodes}",
            f"--node-rank={settings.node_rank}", f"--master-addr={settings.master_addr}",
            f"--master-port={settings.master_port}", "-m", "alignd_server.trainer",
        ])  # fmt: skip
    if env.rank == 0:
        return None
    configure_logging(settings.log_level)
    return worker_loop(settings, env)


def executor(settings: TrainerSettings) -> LocalExecutor | ParallelExecutor:
    """The executor of this process: parallel when torchrun started several ranks."""
    env = RankEnvironment()
    return ParallelExecutor(settings, env) if env.world_size > 1 else LocalExecutor(settings)


def worker_loop(settings: TrainerSettings, env: RankEnvironment) -> NoReturn:
    """Ranks other than 0: run rank 0's commands until it says shut down, then exit."""
    # torchrun passes SIGTERM on to every rank; these leave when rank 0 has drained.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if settings.deterministic:
        use_deterministic_algorithms()
    group = Group(settings, env)
    group.join()
    engine: TrainerEngine | None = None
    while True:
        header, blob = group.receive()
        if header["op"] == "shutdown":
            break
        try:
            engine = _follow(group, engine, header, blob)
        except AligndError as err:
            log.warning("rank %d: %s failed: %s", group.rank, header["op"], err)
    # Leave without tearing the process group down: gloo's worker thread may still be
    # releasing the last broadcast (its tensors need the GIL) while it holds the lock that
    # the group's destructor, run here with the GIL held, waits for — a deadlock seen with
    # a DDP engine's reducer holding the group. Nothing is left to write.
    logging.shutdown()
    os._exit(0)


def _follow(group: Group, engine: TrainerEngine | None, header: dict, blob: bytes):
    """Runs one of rank 0's commands on this rank; returns the engine it leaves."""
    op = header["op"]
    if op == "initialize":
        return _initialize(group, _spec(header["spec"]), header["parallel"])
    if op == "forward_backward":
        batch, temperature = decode_batch(blob), header["temperature"]
        _forward_backward(
            group, engine, batch, header["loss"], header["params"], header["scale"], temperature,
            header["defer_sync"],
        )  # fmt: skip
    elif op == "optim_step":
        _optim_step(group, engine)
    elif op == "save":
        _save(group, engine, Path(header["temporary"]), header["include"], final=None)
    elif op == "gather":
        push.policy_weights(engine)
    elif op == "forward":
        _forward(group, engine, decode_batch(blob), set(header["outputs"]), header["temperature"])
    elif op == "load":
        _load(group, engine, header["path"], header["load_optimizer"])
    return engine


def _spec(data: dict) -> InitSpec:
    lora = LoraSpec(**data["lora"]) if data.get("lora") else None
    return InitSpec(**{**data, "betas": tuple(data["betas"]), "lora": lora})


@contextlib.contextmanager
def _model_errors():
    """A model that cannot be loaded is INVALID_ARGUMENT naming ``model_path``; one that does
    not fit is RESOURCE_EXHAUSTED."""
    try:
        yield
    except AligndError:
        raise
    except torch.OutOfMemoryError as err:
        raise ResourceExhausted(f"the model does not fit in memory: {err}") from None
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InvalidArgument("model_path", f"cannot load a model from it: {detail}") from None


def build_engine(
    spec: InitSpec, device: str, parallel: str, loaded: LoadedModel | None = None
) -> TrainerEngine:
    """A new engine for ``spec`` (on ``loaded`` when given); failures as
    :func:`_model_errors` maps them (the caller keeps its previous engine)."""
    with _model_errors():
        return TrainerEngine(spec, device, parallel, loaded)


def _initialize(group: Group, spec: InitSpec, parallel: str) -> TrainerEngine:
    """Every rank builds the engine. Under FSDP only rank 0 reads the weights (the others
    build the model on the meta device and receive their shards from it), so the ranks agree
    on the loading first: a rank-0 load that fails must not leave the others in a broadcast."""
    loaded, engine, error = None, None, None
    try:
        with _model_errors():
            loaded = load_model(spec, group.device, meta=parallel == "fsdp" and group.rank != 0)
    except AligndError as err:
        error = err
    group.agree(error)
    try:
        engine = build_engine(spec, group.device, parallel, loaded)
    except AligndError as err:
        error = err
    group.agree(error)
    _measure(group, engine)
    return engine


def _measure(group: Group, engine: TrainerEngine) -> None:
    """Every rank's parameter and optimizer bytes, onto ``engine.rank_bytes``."""
    engine.rank_bytes = (
        [int(v) for v in group.gather(float(engine.parameter_bytes()))],
        [int(v) for v in group.gather(float(engine.optimizer_bytes()))],
    )


def _optim_step(group: Group, engine: TrainerEngine):
    result = engine.optim_step()
    _measure(group, engine)
    return result


def _save(group: Group, engine, temporary: Path, include: bool, final: Path | None) -> int:
    """FSDP: every rank writes its shards into ``temporary``; rank 0 (``final`` set) writes
    the gathered weights and moves the checkpoint into place once every rank has written."""
    error = None
    try:
        checkpoint.write(engine, temporary, include, writer=group.rank == 0)
    except AligndError as err:
        error = err
    group.agree(error)
    return checkpoint.commit(temporary, final) if final is not None else 0


def _load(group: Group, engine: TrainerEngine, path: str, load_optimizer: bool) -> int:
    """Every rank reads and checks the checkpoint; only when all of them could does any apply."""
    restored, error = None, None
    try:
        restored = restore.read(engine, path, load_optimizer)
    except AligndError as err:
        error = err
    group.agree(error)
    return restore.apply(engine, restored)


def shard(batch: Batch, loss: str, rank: int, world_size: int) -> Batch | None:
    """The rows of ``batch`` rank ``rank`` computes ``loss`` on (``None``: nothing for it).

    As the loss's spec says: pairwise losses keep each chosen row with its rejected row; rows
    marked in the spec's ``replicated`` input (KTO's KL rows) go to every rank, the others are
    split.
    """
    rows, spec = len(batch.rows), SPECS[loss]
    if spec.shard == "pairs":
        pairs = np.array_split(np.arange(rows // 2), world_size)[rank]
        index = np.concatenate([pairs, pairs + rows // 2])
        by_pair = pairs
    elif spec.replicated is not None and spec.replicated in batch.sequence_inputs:
        kl = batch.sequence_inputs[spec.replicated].astype(bool)
        mine = np.array_split(np.flatnonzero(~kl), world_size)[rank]
        pairs, index, by_pair = mine, np.sort(np.concatenate([mine, np.flatnonzero(kl)])), None
    else:
        index = pairs = np.array_split(np.arange(rows), world_size)[rank]
        by_pair = None
    if len(pairs) == 0:
        return None
    return _take(batch, index, by_pair)


def _take(batch: Batch, index: np.ndarray, by_pair: np.ndarray | None) -> Batch:
    def rows_of(values):
        return [values[i] for i in index]

    sequence = {}
    for name, values in batch.sequence_inputs.items():
        pick = by_pair if by_pair is not None and len(values) * 2 == len(batch.rows) else index
        sequence[name] = values[pick]
    return Batch(
        rows=rows_of(batch.rows), prompts=batch.prompts[index],
        completion_mask=None if batch.completion_mask is None else rows_of(batch.completion_mask),
        token_inputs={k: rows_of(v) for k, v in batch.token_inputs.items()},
        sequence_inputs=sequence,
    )  # fmt: skip


def _forward_backward(group, engine, batch, loss, params, scale, temperature, defer_sync):
    with engine.gradient_sync(not defer_sync):
        return _accumulate(group, engine, batch, loss, params, scale, temperature, defer_sync)


def _accumulate(group, engine, batch, loss, params, scale, temperature, defer_sync):
    part = shard(batch, loss, group.rank, group.world_size)
    empty = part is None  # still forward and backward (weight 0): the collectives need us
    part = shard(batch, loss, 0, group.world_size) if empty else part
    output, error = None, None
    try:
        output = engine.compute_loss(part, loss, params, temperature)
    except AligndError as err:
        error = err
    reported = None if empty else output
    keys = sorted(reported.metrics) if reported is not None else []
    units = reported.weight if reported is not None else 0.0
    values = [0.0] * (4 + MAX_METRICS)
    peaks = [-math.inf] * MAX_METRICS  # ``…/max`` metrics: the maximum over ranks
    values[0] = 1.0 if error is not None else 0.0
    if reported is not None:
        values[1:4] = [units, float(reported.num_tokens), float(reported.loss.detach()) * units]
        for i, key in enumerate(keys[:MAX_METRICS]):
            values[4 + i] = reported.metrics[key] * units
            peaks[i] = reported.metrics[key]
    totals = group.sum(values)
    highest = group.max(peaks)
    if totals[0]:
        raise error or InvalidArgument("batch", f"{int(totals[0])} rank(s) rejected their shard")
    total_units = max(totals[1], 1e-30)
    engine.backward(output, scale * units / total_units, defer_sync)
    metrics = {k: highest[i] if k.endswith("/max") else totals[4 + i] / total_units
               for i, k in enumerate(keys[:MAX_METRICS])}  # fmt: skip
    if "perplexity" in metrics and "nll" in metrics:  # exp of the batch's NLL, not a mean of exps
        metrics["perplexity"] = math.exp(min(metrics["nll"], 700.0))
    combined = LossOutput(torch.tensor(totals[3] / total_units), metrics, int(totals[2]))
    return combined, engine.accumulated


def _forward(group, engine, batch, outputs: set[str], temperature: float) -> dict:
    """Each rank computes its rows; rank 0 gets every row back in order."""
    splits = np.array_split(np.arange(len(batch.rows)), group.world_size)
    mine = splits[group.rank]
    result, error = {}, None
    if len(mine) or engine.sharded:  # FSDP: every rank takes part in each forward
        try:
            rows = mine if len(mine) else splits[0]
            result = engine.forward(_take(batch, rows, None), outputs, temperature)
        except AligndError as err:
            error = err
        result = result if len(mine) else {}
    group.agree(error)
    lengths = [len(r) - int(p) for r, p in zip(batch.rows, batch.prompts, strict=True)]
    width, height = max(lengths), max(len(s) for s in splits)
    gathered: dict = {}
    for name in sorted(outputs):
        local = torch.zeros((height, 1 if name == "rewards" else width), dtype=torch.float32)
        for i, row in enumerate(result.get(name, [])):
            values = np.atleast_1d(np.asarray(row, dtype=np.float32))
            local[i, : len(values)] = torch.from_numpy(values)
        parts = [group.to_device(torch.zeros_like(local)) for _ in range(group.world_size)]
        dist.all_gather(parts, group.to_device(local))
        rows = [parts[r][i].cpu().numpy() for r, s in enumerate(splits) for i in range(len(s))]
        if name == "rewards":
            gathered[name] = np.array([row[0] for row in rows], dtype=np.float32)
        else:
            gathered[name] = [row[:n].copy() for row, n in zip(rows, lengths, strict=True)]
    return gathered


def encode_batch(batch: Batch) -> bytes:
    """A batch as one safetensors blob (flat arrays plus row lengths)."""
    arrays = {
        "rows": np.concatenate(batch.rows).astype(np.int64),
        "lengths": np.array([len(r) for r in batch.rows], dtype=np.int64),
        "prompts": np.asarray(batch.prompts, dtype=np.int64),
    }
    if batch.completion_mask is not None:
        arrays["completion_mask"] = np.concatenate(batch.completion_mask).astype(np.float32)
    for name, rows in batch.token_inputs.items():
        arrays[f"token.{name}"] = np.concatenate(rows).astype(np.float32)
    for name, values in batch.sequence_inputs.items():
        arrays[f"sequence.{name}"] = np.asarray(values, dtype=np.float32)
    return save_arrays(arrays)


def decode_batch(blob: bytes) -> Batch:
    """The inverse of :func:`encode_batch`."""
    arrays = load_arrays(blob)
    lengths = arrays["lengths"]
    prompts = arrays["prompts"]
    rows = np.split(arrays["rows"].astype(np.int32), np.cumsum(lengths)[:-1])
    completion = np.cumsum(lengths - prompts)[:-1]
    batch = Batch(rows=list(rows), prompts=prompts)
    for key, values in arrays.items():
        if key == "completion_mask":
            batch.completion_mask = list(np.split(values, completion))
        elif key.startswith("token."):
            batch.token_inputs[key[len("token.") :]] = list(np.split(values, completion))
        elif key.startswith("sequence."):
            batch.sequence_inputs[key[len("sequence.") :]] = values
    return batch
