"""The ``hf`` engine: continuous batching on a transformers causal LM.

Requests go into one running batch as they arrive. A scheduler on the process's one compute
thread repeats a step: drop the rows of requests whose caller went away, admit waiting
requests that fit (``max_num_seqs`` rows, ``max_running_tokens`` KV tokens; one alone always
runs) — their prompts are prefilled together and their cache joined to the running one — then
decode one token for every running row, and retire each row the step it finishes. A
request's future resolves when its last row is retired. ``close`` stops the loop within a
step.

What transformers gives and what is ours: the model's forward with its ``DynamicCache``
(``transformers.cache_utils``) is the KV cache; retiring rows is the cache's own
``batch_select_indices``. Joining a newcomer's cache to the running one left-pads the shorter
of the two with masked positions and concatenates them by batch: transformers has no call for
that, so it is done here on the cache layers' ``keys``/``values`` (plain ``DynamicLayer``s; a
model whose cache has other layer kinds, such as sliding windows, runs a new batch only once
the running one is done). Transformers' own continuous batching
(``generation.continuous_batching``, paged attention) was not used: it samples every request
with the one ``GenerationConfig`` of its manager (no per-request temperature, top-k/top-p or
n, no per-row seeded RNG, no log-probs of the sampled token under ``logits / T`` before
filtering), owns the model on its own thread (weight swaps could not be placed between our
steps), and its paged kernels do not give ``model.generate``'s numbers.

Sampling is per row: an RNG derived from the request seed and the row's position (a seeded
request samples the same whatever shares its batch), log-probs of the sampled token under
``logits / T`` before filtering, per-row stop strings. Greedy output and log-probs are those
of ``model.generate`` / a forward pass over the sequence (the positions and masks are
``generate``'s; only the last bits of the logits depend on the batch a row shares — jobs that
need bit-identical runs send isolated requests). The model's generation config (repetition
penalty and the like) is not applied: requests say how to sample.

The engine never swaps weights under a running request: the servicer's
:class:`~alignd_server.generation.engine.SwapGate` calls :meth:`HFEngine.swap` only when no
request is inside, and the swap runs on the compute thread after the scheduler went idle.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from alignd_server.common.batching import COMPUTE
from alignd_server.common.errors import Unavailable
from alignd_server.common.info import eos_token_ids
from alignd_server.common.models import LoadedModel
from alignd_server.generation.config import GenerationSettings
from alignd_server.generation.engine import (
    EOS,
    LENGTH,
    STOP,
    EngineLoad,
    Output,
    TokenCallback,
)
from alignd_server.generation.metrics import GenerationMetrics
from alignd_server.generation.sampling import Sampling, choose, row_generator
from alignd_server.generation.weights import named_parameters

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    """One generate call inside the engine."""

    prompts: Sequence[np.ndarray]
    sampling: Sampling
    on_token: TokenCallback | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    entered: float  # perf_counter at generate()
    rows: list[_Row] = field(default_factory=list)
    unfinished: int = 0
    tokens: int = 0  # KV tokens it may hold: prompt + max_new_tokens per row
    last_token_at: float | None = None
    cancelled: bool = False  # set on the event loop, read by the scheduler

    def resolve(self, outputs: list[list[Output]] | None, error: BaseException | None) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if error is None:
                self.future.set_result(outputs)
            else:
                self.future.set_exception(error)

        self.loop.call_soon_threadsafe(settle)


@dataclass(eq=False)
class _Row:
    """One sample being generated."""

    request: _Request
    index: int  # row within its request, prompt-major
    prompt: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None
    text: str | None = None  # set when a stop string cut it


class HFEngine:
    """Generation with transformers models, continuously batched across requests."""

    name = "hf"

    def __init__(
        self, loaded: LoadedModel, settings: GenerationSettings, metrics: GenerationMetrics
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.version = 0
        self.eos_ids = frozenset(eos_token_ids(loaded))
        self.max_rows = settings.max_num_seqs
        self.max_tokens = settings.max_running_tokens
        self.metrics = metrics
        self._pad_id = loaded.tokenizer.pad_token_id
        self._device = loaded.device
        self._lock = threading.Lock()  # guards _waiting, _active, _closed
        self._waiting: deque[_Request] = deque()
        self._active = False  # the scheduler loop is submitted to the compute thread
        self._closed = False
        self._joinable: bool | None = None  # known after the first prefill
        # The running batch; touched only on the compute thread.
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, S) attention mask over the cache
        self._last: torch.Tensor | None = None  # (B,) last sampled token, fed next step
        self._next: torch.Tensor | None = None  # (B,) its position id
        self._running_tokens = 0
        self._prefilling: list[_Request] = []  # admitted, not yet joined to the batch

    # -- requests ------------------------------------------------------------------------

    async def generate(
        self, prompts: Sequence[np.ndarray], sampling: Sampling, on_token: TokenCallback | None
    ) -> list[list[Output]]:
        """n completions per prompt; cancelling the caller takes the request out of the batch
        at the next step."""
        loop = asyncio.get_running_loop()
        request = _Request(prompts, sampling, on_token, loop.create_future(), loop,
                           time.perf_counter())  # fmt: skip
        for p, prompt in enumerate(prompts):
            for s in range(sampling.n):
                generator = row_generator(sampling.seed, p, s, self._device)
                request.rows.append(_Row(request, len(request.rows), p, generator))
            request.tokens += sampling.n * (len(prompt) + sampling.max_new_tokens)
        request.unfinished = len(request.rows)
        with self._lock:
            if self._closed:
                raise Unavailable("the generation server is shutting down")
            self._waiting.append(request)
            if not self._active:
                self._active = True
                COMPUTE.submit(self._run)
        try:
            return await request.future
        except asyncio.CancelledError:
            request.cancelled = True
            raise

    def load(self) -> EngineLoad:
        with self._lock:
            waiting = list(self._waiting)
            rows = [row for request in self._prefilling for row in request.rows]
            rows += self._rows
        running = {id(row.request) for row in rows if row.finish is None}
        return EngineLoad(
            running_requests=len(running),
            waiting_requests=len(waiting),
            running_rows=sum(row.finish is None for row in rows),
            waiting_rows=sum(len(r.rows) for r in waiting),
        )

    async def close(self) -> None:
        """Fails what is inside with UNAVAILABLE and waits for the scheduler to stop (within
        one step)."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            request.resolve(None, Unavailable("the generation server is shutting down"))
        await asyncio.get_running_loop().run_in_executor(COMPUTE, lambda: None)

    # -- the scheduler (compute thread) ----------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    self._fail_running(Unavailable("the generation server is shutting down"))
                    self._active = False
                    return
                self._drop_cancelled_waiting()
                admitted = self._prefilling = self._admit()
                if not admitted and not self._rows:
                    self._active = False
                    return
            try:
                if admitted:
                    self._prefill(admitted)
                self._drop_cancelled_running()
                if self._rows:
                    self._decode()
            except Exception as err:  # a failing forward fails the batch, not the server
                log.exception("generation step failed")
                for request in admitted:
                    request.resolve(None, err)
                self._prefilling = []
                self._fail_running(err)

    def _drop_cancelled_waiting(self) -> None:
        if any(r.cancelled for r in self._waiting):
            self._waiting = deque(r for r in self._waiting if not r.cancelled)

    def _admit(self) -> list[_Request]:
        """Waiting requests that fit the running batch, oldest first (under the lock)."""
        if self._rows and self._joinable is False:
            return []
        admitted, rows, tokens = [], len(self._rows), self._running_tokens
        while self._waiting:
            request = self._waiting[0]
            empty = rows == 0
            fits = rows + len(request.rows) <= self.max_rows and (
                tokens + request.tokens <= self.max_tokens
            )
            if not (empty or fits):
                break
            self._waiting.popleft()
            admitted.append(request)
            rows += len(request.rows)
            tokens += request.tokens
            if self._joinable is None:
                break  # learn whether caches can be joined from this one first
        return admitted

    def _prefill(self, requests: list[_Request]) -> None:
        """Runs the prompts of ``requests`` together and joins their rows to the batch."""
        rows = [row for request in requests for row in request.rows]
        ids, mask = self._left_pad([row.request.prompts[row.prompt] for row in rows])  # (B, P)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P), as model.generate does
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )  # fmt: skip
        if self._joinable is None:
            self._joinable = all(type(layer) is DynamicLayer for layer in cache.layers)
            if not self._joinable:
                log.info("the model's cache is not joinable: batches run one after another")
        tokens = self._sample(out.logits[:, -1].float(), rows)
        for request in requests:
            self._running_tokens += request.tokens
        with self._lock:
            self._join(rows, cache, mask, tokens, positions[:, -1] + 1)
            self._prefilling = []
        self._retire()

    def _decode(self) -> None:
        """One token for every running row."""
        mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=-1)
        with torch.inference_mode():
            out = self.model(
                input_ids=self._last[:, None], attention_mask=mask,
                position_ids=self._next[:, None], past_key_values=self._cache, use_cache=True,
                logits_to_keep=1,
            )  # fmt: skip
        self._mask = mask
        self._next = self._next + 1
        self.metrics.step_rows.observe(len(self._rows))
        self._last = self._sample(out.logits[:, -1].float(), self._rows)
        self._retire()

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Chooses each row's next token (rows grouped by how they sample) and records it.

        Args:
            logits: (B, V) float32 next-token logits of ``rows``.

        Returns:
            (B,) int64 the chosen tokens.
        """
        groups: dict[tuple, list[int]] = {}
        for b, row in enumerate(rows):
            s = row.request.sampling
            groups.setdefault((s.greedy, s.temperature, s.top_k, s.top_p), []).append(b)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        logprobs = torch.empty(len(rows), dtype=torch.float32, device=logits.device)
        for index in groups.values():
            sampling = rows[index[0]].request.sampling
            at = torch.tensor(index, device=logits.device)
            chosen, picked = choose(logits[at], sampling, [rows[b].generator for b in index])
            tokens[at], logprobs[at] = chosen, picked
        now = time.perf_counter()
        touched: dict[int, _Request] = {}
        for row, token, logprob in zip(rows, tokens.tolist(), logprobs.tolist(), strict=True):
            self._append(row, token, logprob)
            request = row.request
            touched[id(request)] = request
            if request.on_token is not None:
                request.on_token(row.index, token, logprob)
        for request in touched.values():
            if request.last_token_at is None:
                self.metrics.first_token.observe(now - request.entered)
            else:
                self.metrics.inter_token.observe(now - request.last_token_at)
            request.last_token_at = now
        return tokens

    def _append(self, row: _Row, token: int, logprob: float) -> None:
        sampling = row.request.sampling
        row.tokens.append(token)
        row.logprobs.append(logprob)
        if token in self.eos_ids and not sampling.ignore_eos:
            row.finish = EOS
        elif token in sampling.stop_token_ids or (sampling.stop and self._hit_stop(row)):
            row.finish = STOP
        elif len(row.tokens) >= sampling.max_new_tokens:
            row.finish = LENGTH

    def _hit_stop(self, row: _Row) -> bool:
        sampling = row.request.sampling
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=sampling.skip_special_tokens)
        cut = min((i for s in sampling.stop if (i := text.find(s)) >= 0), default=-1)
        if cut < 0:
            return False
        row.text = text[:cut]
        return True

    # -- the running batch (compute thread) ------------------------------------------------

    def _join(
        self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, last: torch.Tensor,
        next_positions: torch.Tensor,
    ) -> None:  # fmt: skip
        """Appends prefilled ``rows`` (their cache, (B, P) mask, last tokens and next
        positions) to the running batch, left-padding the shorter side's cache and mask."""
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            self._last, self._next = last, next_positions
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
        self._last = torch.cat([self._last, last])
        self._next = torch.cat([self._next, next_positions])
        self._rows = self._rows + rows

    def _retire(self) -> None:
        """Takes finished rows out of the batch and resolves requests whose rows all ended."""
        keep = [b for b, row in enumerate(self._rows) if row.finish is None]
        for row in self._rows:
            if row.finish is not None:
                request = row.request
                request.unfinished -= 1
                if request.unfinished == 0:
                    self._running_tokens -= request.tokens
                    request.resolve(self._outputs(request), None)
        self._select(keep)

    def _drop_cancelled_running(self) -> None:
        if not any(row.request.cancelled for row in self._rows):
            return
        dropped = {id(r.request): r.request for r in self._rows if r.request.cancelled}
        for request in dropped.values():
            self._running_tokens -= request.tokens
        self._select([b for b, row in enumerate(self._rows) if not row.request.cancelled])

    def _select(self, keep: list[int]) -> None:
        """Keeps rows ``keep`` of the batch (cache included) and drops leading cache columns
        no remaining row attends to."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._rows = [self._rows[b] for b in keep]
        self._mask, self._last, self._next = self._mask[index], self._last[index], self._next[index]
        if self._joinable:
            start = int(self._mask.any(dim=0).long().argmax())  # first column anyone uses
            if start:
                self._mask = self._mask[:, start:]
                for layer in self._cache.layers:
                    layer.keys = layer.keys[:, :, start:]
                    layer.values = layer.values[:, :, start:]

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._last, self._next = [], None, None, None, None
        self._running_tokens = 0

    def _fail_running(self, error: BaseException) -> None:
        for request in {id(r.request): r.request for r in self._rows}.values():
            request.resolve(None, error)
        self._reset()

    def _outputs(self, request: _Request) -> list[list[Output]]:
        results: list[list[Output]] = [[] for _ in request.prompts]
        skip = request.sampling.skip_special_tokens
        for row in request.rows:
            text = row.text
            if text is None:
                text = self.tokenizer.decode(row.tokens, skip_special_tokens=skip)
            results[row.prompt].append(
                Output(
                    np.asarray(row.tokens, dtype=np.int32),
                    np.asarray(row.logprobs, dtype=np.float32),
                    text,
                    row.finish or LENGTH,
                )
            )
        return results

    def _left_pad(self, rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P) left-padded ids and attention mask."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, width - len(row) :] = torch.tensor(np.asarray(row), dtype=torch.long)
            mask[b, width - len(row) :] = 1
        return ids.to(self._device), mask.to(self._device)

    # -- weights -------------------------------------------------------------------------

    async def swap(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        """Copies ``tensors`` into the named parameters and sets ``version``, on the compute
        thread once the scheduler is idle."""
        await asyncio.get_running_loop().run_in_executor(COMPUTE, self._swap, tensors, version)

    def _swap(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        # The names the update was checked against: a tied weight answers to each of its names.
        params = named_parameters(self.model)
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(dtype=params[name].dtype))
        self.version = version


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` with zeros prepended on its sequence dimension up to ``width``: dim 1 of a
    (B, S) mask, dim 2 of (B, H, S, D) keys or values."""
    dim = 1 if tensor.dim() == 2 else 2
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
