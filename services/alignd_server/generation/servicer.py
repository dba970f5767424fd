"""GenerationService servicer: proto <-> domain, the row queue limit, and the swap gate.

Requests pass :class:`~alignd_server.generation.engine.SwapGate` into the engine (continuous
batching across callers); weight updates take the gate alone, so every completion reports the
one version all its tokens came from. A caller that goes away or whose deadline passes has its
request taken out of the engine (grpc.aio cancels the handler; the engine drops the rows at its
next step).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator

from grpc import aio

from alignd.clients.generation import ACCEPTED_KEY
from alignd.tensors import from_numpy
from alignd.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from alignd_server.common import collective
from alignd_server.common.errors import Aborted, InvalidArgument, ResourceExhausted, Unavailable
from alignd_server.common.holder import ModelHolder, in_daemon_thread
from alignd_server.common.info import server_info
from alignd_server.common.metrics import ServerMetrics
from alignd_server.common.models import load_causal_lm
from alignd_server.common.storage import StorageRoots
from alignd_server.common.tokenization import tokenize
from alignd_server.common.tokenize_rpc import prompt_from_proto, serve_tokenize
from alignd_server.common.validation import check_version, in_range
from alignd_server.generation.config import GenerationSettings
from alignd_server.generation.engine import EngineLoad, GenerationEngine, Output, SwapGate
from alignd_server.generation.hf_engine import HFEngine
from alignd_server.generation.metrics import GenerationMetrics
from alignd_server.generation.sampling import Sampling, sampling_from_proto
from alignd_server.generation.weights import (
    StreamAssembler,
    check_finite,
    drain,
    named_parameters,
    paced,
    read_directory,
)
from alignd_server.trainer.targets import split_address

_IDLE = EngineLoad(0, 0, 0, 0)
SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
FINISH = {
    "eos": generation_pb2.FINISH_REASON_EOS,
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
}


def _completion(output: Output) -> generation_pb2.Completion:
    return generation_pb2.Completion(
        token_ids=from_numpy(output.token_ids),
        text=output.text,
        logprobs=from_numpy(output.logprobs),
        finish_reason=FINISH[output.finish_reason],
    )


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Samples from the policy and takes versioned weight updates."""

    name = SERVICE

    def __init__(self, settings: GenerationSettings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.holder = ModelHolder("policy")
        self.started_at = time.time()
        self.metrics = GenerationMetrics(metrics.registry)
        self.engine: GenerationEngine | None = None
        self.roots = StorageRoots(settings.storage_root)
        self._updating = asyncio.Lock()
        self._queued_rows = 0  # rows (prompts x n) of the requests in generation or waiting
        self._queued_requests = 0
        self.gate = SwapGate(
            settings.swap_policy,
            on_swap_wait=self.metrics.swap_wait.observe,
            on_restart=self.metrics.aborted.labels("restart").inc,
        )
        self.metrics.running.set_function(lambda: self._load().running_requests)
        self.metrics.waiting.set_function(
            lambda: max(0, self._queued_requests - self._load().running_requests)
        )

    def _load(self):
        engine = self.engine
        return engine.load() if engine is not None else _IDLE

    def register(self, server: aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self, server)

    async def start(self) -> None:
        loaded = await self.holder.load_configured(self.settings, load_causal_lm)
        limit = loaded.sequence_limit(self.settings.max_sequence_length)
        self.settings = self.settings.model_copy(update={"max_sequence_length": limit})
        if self.settings.engine == "vllm":
            from alignd_server.generation.vllm_engine import VLLMEngine

            self.engine = await in_daemon_thread(
                lambda: VLLMEngine(loaded, self.settings, self.metrics)
            )
        else:
            self.engine = HFEngine(loaded, self.settings, self.metrics)

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.close()
        self.engine = None
        self.holder.loaded = None

    def _engine(self) -> GenerationEngine:
        self.holder.require()
        return self.engine

    def _prompts(self, prompts, sampling: Sampling, field: str = "prompts") -> list:
        loaded = self.holder.require()
        budget = self.settings.max_sequence_length - sampling.max_new_tokens
        if budget < 1:
            raise InvalidArgument(
                "params.max_new_tokens",
                f"leaves no room for a prompt within max_sequence_length "
                f"{self.settings.max_sequence_length}",
            )
        rows = []
        for i, prompt in enumerate(prompts):
            value = prompt_from_proto(prompt, f"{field}[{i}]")
            rows.append(
                tokenize(
                    loaded.tokenizer, value, max_length=budget, field=f"{field}[{i}]"
                ).input_ids
            )
        return rows

    def _sampling(self, params: generation_pb2.SamplingParams) -> Sampling:
        return sampling_from_proto(
            params,
            max_new_tokens=self.settings.max_new_tokens,
            vocab_size=self.holder.require().vocab_size,
        )

    def _record(self, outputs: list[list[Output]], prompts: list, start: float) -> None:
        tokens = sum(len(o.token_ids) for group in outputs for o in group)
        self.metrics.generated_tokens.inc(tokens)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        self.metrics.batch_size.observe(sum(len(group) for group in outputs))
        self.metrics.tokens_per_second.set(tokens / max(time.perf_counter() - start, 1e-9))

    async def _serve(self, call, context, *, restartable: bool, isolated: bool):
        """``call()`` through the gate, counting requests the engine drops before their end."""
        try:
            return await self.gate.run(call, restartable=restartable, isolated=isolated)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            self.metrics.aborted.labels("deadline" if expired else "cancelled").inc()
            raise
        except Unavailable:
            self.metrics.aborted.labels("shutdown").inc()
            raise

    @contextlib.contextmanager
    def _queued(self, rows: int) -> Iterator[None]:
        """Counts ``rows`` against max_queue_size while a request waits or generates."""
        limit = self.settings.max_queue_size
        if self._queued_rows + rows > limit:
            raise ResourceExhausted(
                f"{self._queued_rows} rows queued, limit max_queue_size {limit}; retry later"
            )
        self._queued_rows += rows
        self._queued_requests += 1
        try:
            yield
        finally:
            self._queued_rows -= rows
            self._queued_requests -= 1

    def _check_work(self, prompts: list, sampling: Sampling, field: str) -> None:
        """The request's rows (prompts x n) must fit max_request_tokens in the KV cache."""
        total = sampling.n * sum(len(p) + sampling.max_new_tokens for p in prompts)
        limit = self.settings.max_request_tokens
        if total > limit:
            raise InvalidArgument(
                field,
                f"{len(prompts)} prompts x n {sampling.n} need {total} tokens (prompt + "
                f"max_new_tokens per row), more than max_request_tokens {limit}",
            )

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context
    ) -> generation_pb2.GenerateResponse:
        engine = self._engine()
        count = len(request.prompts)
        if not 1 <= count <= self.settings.max_batch_size:
            raise InvalidArgument(
                "prompts",
                f"{count} prompts, must be 1 .. max_batch_size {self.settings.max_batch_size}",
            )
        sampling = self._sampling(request.params)
        self._check_work([()] * count, sampling, "prompts")  # before tokenizing anything
        with self._queued(count * sampling.n):
            prompts = await asyncio.to_thread(self._prompts, request.prompts, sampling)
            self._check_work(prompts, sampling, "prompts")
            start = time.perf_counter()

            async def call():  # the version cannot change while the request is inside
                return await engine.generate(prompts, sampling, None), engine.version

            outputs, version = await self._serve(
                call, context, restartable=True, isolated=request.isolated
            )
        self._record(outputs, prompts, start)
        return generation_pb2.GenerateResponse(
            results=[
                generation_pb2.PromptCompletions(
                    prompt_token_ids=from_numpy(prompt),
                    completions=[_completion(o) for o in group],
                )
                for prompt, group in zip(prompts, outputs, strict=True)
            ],
            weights_version=version,
        )

    async def GenerateStream(
        self, request: generation_pb2.GenerateStreamRequest, context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        engine = self._engine()
        sampling = self._sampling(request.params)
        self._check_work([()], sampling, "prompt")
        with self._queued(sampling.n):
            stream = self._stream(engine, request.prompt, sampling, context, request.isolated)
            async with contextlib.aclosing(stream) as messages:
                async for message in messages:
                    yield message

    async def _stream(
        self, engine, prompt_message, sampling: Sampling, context, isolated: bool
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        (prompt,) = await asyncio.to_thread(self._prompts, [prompt_message], sampling, "prompt")
        self._check_work([prompt], sampling, "prompt")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rows: list[list[int]] = [[] for _ in range(sampling.n)]
        texts = [""] * sampling.n  # text decoded so far, per sample

        def on_token(row: int, token: int, logprob: float) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (row, token, logprob))

        start = time.perf_counter()
        version = [engine.version]

        async def call():  # streams are not restarted: their tokens are already out
            version[0] = engine.version
            return await engine.generate([prompt], sampling, on_token)

        task = asyncio.ensure_future(
            self._serve(call, context, restartable=False, isolated=isolated)
        )
        task.add_done_callback(lambda _: loop.call_soon(events.put_nowait, None))
        first = True
        tokenizer = self.holder.require().tokenizer
        try:
            while (event := await events.get()) is not None:
                row, token, logprob = event
                before = texts[row]
                rows[row].append(token)
                after = tokenizer.decode(
                    rows[row], skip_special_tokens=sampling.skip_special_tokens
                )
                texts[row] = after
                message = generation_pb2.GenerateStreamResponse(
                    index=row,
                    token_ids=from_numpy([token], common_pb2.DTYPE_INT32),
                    text=after[len(before) :] if after.startswith(before) else after,
                    logprobs=from_numpy([logprob], common_pb2.DTYPE_FLOAT32),
                    weights_version=version[0],
                )
                if first:
                    message.prompt_token_ids.CopyFrom(from_numpy(prompt))
                    first = False
                yield message
            outputs = task.result()
            self._record(outputs, [prompt], start)
            for index, output in enumerate(outputs[0]):
                yield generation_pb2.GenerateStreamResponse(
                    index=index,
                    finish_reason=FINISH[output.finish_reason],
                    weights_version=version[0],
                )
        finally:
            task.cancel()

    async def UpdateWeights(
        self, request_iterator, context
    ) -> generation_pb2.UpdateWeightsResponse:
        """Takes the header and answers it — response headers carrying ``alignd-update:
        accepted`` mean: send the chunks — then takes the chunks and the commit. A sender that
        waits for that answer after its header (the SDK's asyncio client does) sees a rejected
        header's status rather than a failed write, and sends no weights for nothing."""
        engine = self._engine()
        messages = paced(
            request_iterator, self.settings.update_idle_timeout_s, self.settings.update_timeout_s
        )
        header = await anext(messages, None)  # read before answering, so the header's write
        if self._updating.locked():  # cannot race the answer
            raise Aborted("another weight update is in progress; retry after it finishes")
        async with self._updating:
            start = time.perf_counter()
            assembler = StreamAssembler(named_parameters(engine.model), engine.version)
            if header is None:
                raise InvalidArgument("messages", "the stream is empty; it starts with a header")
            assembler.add(0, header)
            await context.send_initial_metadata(((ACCEPTED_KEY, "accepted"),))
            try:
                tensors = await self._assemble(assembler, messages)
            except InvalidArgument:
                await drain(messages)  # the sender is still writing: let it finish, so that
                raise  # it reads this status rather than a failed write
            return await self._swap(engine, assembler, tensors, start)

    async def _swap(self, engine, assembler: StreamAssembler, tensors: dict, start: float):
        """Swaps the assembled ``tensors`` in (behind the gate) and answers the update."""
        async with self.gate.exclusive():
            await engine.swap(tensors, assembler.header.version)
        return self._updated(
            assembler.header.version, len(tensors), assembler.total, start,
            assembler.header.partial,
        )  # fmt: skip

    async def _assemble(self, assembler: StreamAssembler, messages) -> dict:
        """The chunks and commit after the header; the checked tensors."""
        tensors, index = None, 1
        async for part in messages:
            if tensors is not None:
                raise InvalidArgument(f"messages[{index}]", "nothing may follow the commit")
            tensors = assembler.add(index, part)
            index += 1
        if tensors is None:
            raise InvalidArgument(
                "commit", "the stream ended before its commit; the serving weights are unchanged"
            )
        await asyncio.to_thread(check_finite, tensors, assembler.field)
        return tensors

    async def ReceiveWeights(
        self, request: generation_pb2.ReceiveWeightsRequest, context
    ) -> generation_pb2.UpdateWeightsResponse:
        engine = self._engine()
        try:
            host, port = split_address(request.rendezvous)
        except ValueError as err:
            raise InvalidArgument("rendezvous", str(err)) from None
        if not re.fullmatch(r"[0-9a-f]{32}", request.group):
            raise InvalidArgument("group", "must be 32 lowercase hex digits")
        bucket = request.bucket_bytes or collective.DEFAULT_BUCKET_BYTES
        in_range(bucket, "bucket_bytes", collective.MIN_BUCKET_BYTES, collective.MAX_BUCKET_BYTES)
        timeout = collective.DEFAULT_TIMEOUT_S
        if request.timeout_seconds:
            timeout = in_range(request.timeout_seconds, "timeout_seconds", 0,
                               collective.MAX_TIMEOUT_S, open_low=True)  # fmt: skip
        if self._updating.locked():
            raise Aborted("another weight update is in progress; retry after it finishes")
        async with self._updating:
            start = time.perf_counter()
            assembler = StreamAssembler(named_parameters(engine.model), engine.version)
            assembler.add(0, generation_pb2.UpdateWeightsRequest(header=request.header))

            def fill(buffers: list) -> int:
                try:
                    store = collective.connect(host, port, timeout)
                    collective.accept(store, request.group)  # the header passed: send
                    group = collective.join(store, request.group, 1, timeout)
                    return collective.receive(group, buffers, int(bucket), timeout)
                except (RuntimeError, OSError) as err:  # torch's store and gloo errors
                    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
                    raise Unavailable(
                        f"rendezvous {request.rendezvous}: the collective transfer failed: "
                        f"{detail}; the serving weights are unchanged"
                    ) from None

            tensors = await asyncio.to_thread(assembler.take_all, fill)
            await asyncio.to_thread(check_finite, tensors, assembler.field)
            return await self._swap(engine, assembler, tensors, start)

    async def LoadWeights(
        self, request: generation_pb2.LoadWeightsRequest, context
    ) -> generation_pb2.UpdateWeightsResponse:
        engine = self._engine()
        check_version(request.version, engine.version, "version")
        directory = self.roots.resolve(request.path, "path")
        if self._updating.locked():
            raise Aborted("another weight update is in progress; retry after it finishes")
        async with self._updating:
            start = time.perf_counter()
            params = named_parameters(engine.model)
            tensors, size = await asyncio.to_thread(
                read_directory, directory, self.roots, params, request.partial
            )
            async with self.gate.exclusive():
                await engine.swap(tensors, request.version)
            return self._updated(request.version, len(tensors), size, start, request.partial)

    def _updated(
        self, version: int, count: int, size: int, start: float, partial: bool
    ) -> generation_pb2.UpdateWeightsResponse:
        seconds = time.perf_counter() - start
        self.metrics.weights_version.set(version)
        self.metrics.update_seconds.observe(seconds)
        self.metrics.update_bytes.inc(size)
        return generation_pb2.UpdateWeightsResponse(
            version=version, tensors_updated=count, bytes=size, seconds=seconds, partial=partial
        )

    async def Tokenize(
        self, request: common_pb2.TokenizeRequest, context
    ) -> common_pb2.TokenizeResponse:
        return await serve_tokenize(request, self.holder.require().tokenizer, self.settings)

    async def GetInfo(
        self, request: common_pb2.GetInfoRequest, context
    ) -> generation_pb2.GenerationInfo:
        info = server_info(
            SERVICE,
            self.settings,
            self.started_at,
            self.holder.require(),
            max_new_tokens=self.settings.max_new_tokens,
            max_request_tokens=self.settings.max_request_tokens,
        )
        return generation_pb2.GenerationInfo(
            server=info, engine=self.settings.engine, weights_version=self._engine().version
        )
