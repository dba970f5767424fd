"""TrainerService servicer: proto <-> domain only."""

from __future__ import annotations

import asyncio
import time

from grpc import aio

from alignd.tensors import from_numpy, from_ragged
from alignd.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from alignd_server.common.batching import COMPUTE
from alignd_server.common.errors import FailedPrecondition, InvalidArgument
from alignd_server.common.info import model_info, server_info
from alignd_server.common.metrics import ServerMetrics
from alignd_server.common.storage import StorageRoots
from alignd_server.common.tokenize_rpc import serve_tokenize
from alignd_server.common.validation import optional_in_range, temperature
from alignd_server.trainer import convert, parallel, push
from alignd_server.trainer.config import TrainerSettings
from alignd_server.trainer.engine import SEQUENCE_CLASSIFIER, TrainerEngine
from alignd_server.trainer.metrics import TrainerMetrics
from alignd_server.trainer.targets import PushTargets

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
OUTPUTS = {
    trainer_pb2.FORWARD_OUTPUT_LOGPROBS: "logprobs",
    trainer_pb2.FORWARD_OUTPUT_VALUES: "values",
    trainer_pb2.FORWARD_OUTPUT_ENTROPY: "entropy",
    trainer_pb2.FORWARD_OUTPUT_REWARDS: "rewards",
}
KIND_ENUM = {v: k for k, v in convert.KINDS.items()}


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """The training primitives over one model (Initialize first)."""

    name = SERVICE

    def __init__(self, settings: TrainerSettings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.engine: TrainerEngine | None = None
        self.limits = settings  # settings with the model's sequence limit, once initialized
        self.roots = StorageRoots(settings.storage_root)
        self.push_targets = PushTargets(settings.push_targets)
        self.executor = parallel.executor(settings)
        self.metrics = TrainerMetrics(metrics.registry)
        self.metrics.world_size.set(self.executor.world_size)
        self._heartbeat: asyncio.Task | None = None

    def register(self, server: aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(self, server)

    async def start(self) -> None:
        """Waits for the other ranks, if any (the model comes with Initialize)."""
        await self._run(self.executor.start)
        if self.executor.world_size > 1:
            self._heartbeat = asyncio.create_task(self._keep_ranks_alive())

    async def _keep_ranks_alive(self) -> None:
        interval = min(60.0, self.settings.dist_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            await self._run(self.executor.ping)

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self.engine = None
        await self._run(self.executor.close)

    def _engine(self) -> TrainerEngine:
        if self.engine is None:
            raise FailedPrecondition("no model: call Initialize first")
        return self.engine

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(COMPUTE, fn, *args)

    async def Initialize(self, request, context) -> trainer_pb2.InitializeResponse:
        spec = convert.init_spec(request, self.settings, self.roots)
        # The old model serves on until the new one has loaded: a failed Initialize keeps it.
        engine = await self._run(self.executor.initialize, spec)
        limit = engine.loaded.sequence_limit(self.settings.max_sequence_length)
        self.engine = engine
        self._memory(engine)
        self.limits = self.settings.model_copy(update={"max_sequence_length": limit})
        return trainer_pb2.InitializeResponse(
            model=model_info(engine.loaded), trainable_parameters=engine.trainable_parameters
        )

    def _batch(self, engine: TrainerEngine, message) -> convert.Batch:
        return convert.batch(
            message, vocab_size=engine.loaded.vocab_size, settings=self.limits,
            classifier=engine.spec.kind == SEQUENCE_CLASSIFIER,
        )  # fmt: skip

    async def ForwardBackward(self, request, context) -> trainer_pb2.ForwardBackwardResponse:
        engine = self._engine()
        name, params, temperature = convert.loss(request.loss)
        engine.check_loss(name)
        batch = self._batch(engine, request.batch)
        scale = optional_in_range(
            request, "loss_scale", "loss_scale", 1.0, 0, convert.MAX_LOSS_SCALE, open_low=True
        )
        output, accumulated = await self._run(
            self.executor.forward_backward, engine, batch, name, params, scale, temperature,
            request.defer_sync,
        )  # fmt: skip
        self.metrics.loss.labels(name).set(float(output.loss.detach()))
        self.metrics.tokens.inc(output.num_tokens)
        return trainer_pb2.ForwardBackwardResponse(
            loss=float(output.loss.detach()), metrics=output.metrics, num_tokens=output.num_tokens,
            accumulated_batches=accumulated,
        )  # fmt: skip

    async def OptimStep(self, request, context) -> trainer_pb2.OptimStepResponse:
        engine = self._engine()
        norm, lr, step = await self._run(self.executor.optim_step, engine)
        self._memory(engine)
        self.metrics.step.set(step)
        self.metrics.learning_rate.set(lr)
        self.metrics.grad_norm.set(norm)
        return trainer_pb2.OptimStepResponse(grad_norm=norm, learning_rate=lr, step=step)

    async def Forward(self, request, context) -> trainer_pb2.ForwardResponse:
        engine = self._engine()
        if not request.outputs:
            raise InvalidArgument("outputs", "ask for at least one output")
        if any(o not in OUTPUTS for o in request.outputs):
            raise InvalidArgument("outputs", "unknown output")
        outputs = {OUTPUTS[o] for o in request.outputs}
        batch = self._batch(engine, request.batch)
        result = await self._run(
            self.executor.forward, engine, batch, outputs, temperature(request)
        )
        response = trainer_pb2.ForwardResponse()
        for name, rows in result.items():
            if name == "rewards":
                response.rewards.CopyFrom(from_numpy(rows.astype("float32")))
            else:
                getattr(response, name).CopyFrom(from_ragged(rows, common_pb2.DTYPE_FLOAT32))
        return response

    async def SaveCheckpoint(self, request, context) -> trainer_pb2.SaveCheckpointResponse:
        engine = self._engine()
        include = request.include_optimizer if request.HasField("include_optimizer") else True
        path = self.roots.resolve(request.path, "path", write=True)
        with self.metrics.checkpoint_seconds.time():
            size = await self._run(self.executor.save, engine, path, include)
        return trainer_pb2.SaveCheckpointResponse(path=request.path, bytes=size, step=engine.step)

    async def LoadCheckpoint(self, request, context) -> trainer_pb2.LoadCheckpointResponse:
        engine = self._engine()
        optimizer = request.load_optimizer if request.HasField("load_optimizer") else True
        path = self.roots.resolve(request.path, "path")
        step = await self._run(self.executor.load, engine, str(path), optimizer)
        self.metrics.step.set(step)
        return trainer_pb2.LoadCheckpointResponse(step=step)

    async def PushWeights(self, request, context) -> trainer_pb2.PushWeightsResponse:
        engine = self._engine()
        if engine.spec.kind == SEQUENCE_CLASSIFIER:
            raise InvalidArgument("targets", "a sequence_classifier has no policy to push")
        spec = convert.push_spec(request, self.roots)
        await self.push_targets.check(spec.addresses)  # last: it may resolve names
        with self.metrics.push_seconds.time():
            weights = await self._run(self.executor.policy_weights, engine)
            if spec.rendezvous is not None:
                results = await push.push_collective(
                    weights, spec.addresses, spec.version, spec.timeout, spec.rendezvous,
                    spec.bucket_bytes, self.settings,
                )  # fmt: skip
            else:
                results = await push.push(
                    weights, spec.addresses, spec.version, spec.timeout, spec.shared,
                    self.settings,
                )  # fmt: skip
        self.metrics.push_bytes.inc(sum(r.bytes for r in results))
        if any(r.ok for r in results):
            engine.pushed_version = spec.version
        return trainer_pb2.PushWeightsResponse(results=results)

    async def Tokenize(self, request, context) -> common_pb2.TokenizeResponse:
        return await serve_tokenize(request, self._engine().loaded.tokenizer, self.limits)

    async def GetState(self, request, context) -> trainer_pb2.TrainerState:
        engine = self.engine
        if engine is None:
            return trainer_pb2.TrainerState(initialized=False)
        return trainer_pb2.TrainerState(
            initialized=True, kind=KIND_ENUM[engine.spec.kind], step=engine.step,
            accumulated_batches=engine.accumulated, learning_rate=engine.learning_rate,
            trainable_parameters=engine.trainable_parameters, pushed_version=engine.pushed_version,
        )  # fmt: skip

    def _memory(self, engine: TrainerEngine) -> None:
        parameters, optimizer = engine.rank_bytes
        for rank, (held, state) in enumerate(zip(parameters, optimizer, strict=True)):
            self.metrics.parameter_bytes.labels(str(rank)).set(held)
            self.metrics.optimizer_bytes.labels(str(rank)).set(state)

    async def GetInfo(self, request, context) -> trainer_pb2.TrainerInfo:
        engine = self.engine
        info = server_info(SERVICE, self.limits, self.started_at, engine and engine.loaded)
        parameters, optimizer = engine.rank_bytes if engine is not None else ([], [])
        return trainer_pb2.TrainerInfo(
            server=info, world_size=self.executor.world_size, backend=self.executor.backend,
            parallel=self.executor.parallel, dtype=engine.spec.dtype if engine else "",
            parameter_bytes=parameters, optimizer_bytes=optimizer,
            packing=bool(engine and engine.spec.packing),
        )  # fmt: skip
