"""Scorers: reward models and Python functions, each behind its own dynamic batcher.

A model scorer tokenizes (prompt, response) with the shared tokenizer (the chat template when
the model has one, so scoring sees exactly what the trainer trained on), batches items across
requests, and returns the raw head output after the model's normalisation. A function scorer
calls ``module:function(prompt, response, label) -> float`` for each item, batched the same
way; a ``ValueError``, ``TypeError`` or ``KeyError`` it raises is the caller's input error
(INVALID_ARGUMENT), anything else a failure of the scorer (INTERNAL).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from pydantic import BaseModel

from alignd.models import resolve_model
from alignd_server.common.batching import BatcherMetrics, DynamicBatcher
from alignd_server.common.config import BatchingServerSettings
from alignd_server.common.errors import InvalidArgument
from alignd_server.common.forward import pad_right, sequence_scores
from alignd_server.common.models import LoadedModel, load_sequence_classifier
from alignd_server.common.tokenization import check_text, max_text_bytes, tokenize

NORMALIZATION_FILE = "alignd_reward.json"

PromptValue = str | list[dict[str, str]]


@dataclass(frozen=True)
class ScoreInput:
    """One (prompt, response) to score, with the field names its errors use."""

    prompt: PromptValue
    response: str
    label: str | None
    prompt_field: str
    response_field: str


class Normalization(BaseModel):
    """``clip(scale * (raw + offset), clip_min, clip_max)``, stored next to a reward model in
    ``alignd_reward.json``."""

    offset: float = 0.0
    scale: float = 1.0
    clip_min: float | None = None
    clip_max: float | None = None

    @classmethod
    def for_model(cls, path: Path) -> Normalization:
        file = path / NORMALIZATION_FILE
        return cls.model_validate(json.loads(file.read_text())) if file.exists() else cls()

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """(N,) raw scores -> (N,) float32 normalised scores."""
        scores = self.scale * (raw.astype(np.float64) + self.offset)
        if self.clip_min is not None or self.clip_max is not None:
            scores = np.clip(scores, self.clip_min, self.clip_max)
        return scores.astype(np.float32)


class Scorer(Protocol):
    """Scores batches of (prompt, response) items."""

    name: str
    kind: str  # "model" or "function"
    max_length: int  # most tokens of one (prompt, response) item

    def check_capacity(self, count: int) -> None:
        """Raises ResourceExhausted now if ``count`` more items cannot be queued."""

    async def score(
        self, inputs: Sequence[ScoreInput], deadline: float | None, isolated: bool = False
    ) -> np.ndarray:
        """(N,) float32 scores of ``inputs`` (``isolated``: batched only with each other)."""

    def start(self) -> None:
        """Starts the scorer's batcher on the running loop."""

    async def stop(self) -> None:
        """Stops the batcher."""


def _batcher(name: str, run, settings: BatchingServerSettings, metrics, tokens: bool):
    return DynamicBatcher(
        f"reward:{name}",
        run,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens if tokens else 2**62,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue_size=settings.max_queue_size,
        metrics=metrics,
    )


class ModelScorer:
    """A one-label sequence classifier."""

    kind = "model"

    def __init__(
        self, name: str, loaded: LoadedModel, settings: BatchingServerSettings, metrics
    ) -> None:
        self.name = name
        self.loaded = loaded
        self.settings = settings
        self.normalization = Normalization.for_model(Path(loaded.path))
        self.max_length = loaded.sequence_limit(settings.max_sequence_length)
        self._pad_id = loaded.tokenizer.pad_token_id
        self.batcher = _batcher(name, self._run, settings, metrics, tokens=True)

    def start(self) -> None:
        self.batcher.start()

    def check_capacity(self, count: int) -> None:
        self.batcher.check_capacity(count)

    async def stop(self) -> None:
        await self.batcher.stop()

    def tokenize(self, inputs: Sequence[ScoreInput]) -> list[np.ndarray]:
        """(T_i,) int32 token rows; over-long items are rejected, naming their fields."""
        return [
            tokenize(
                self.loaded.tokenizer,
                item.prompt,
                item.response,
                max_length=self.max_length,
                field=item.prompt_field,
                completion_field=item.response_field,
            ).input_ids
            for item in inputs
        ]

    async def score(
        self, inputs: Sequence[ScoreInput], deadline: float | None, isolated: bool = False
    ) -> np.ndarray:
        rows = await asyncio.to_thread(self.tokenize, inputs)
        raw = await self.batcher.submit(rows, [len(r) for r in rows], deadline, isolated=isolated)
        return self.normalization.apply(np.asarray(raw, dtype=np.float32))

    def _run(self, rows: list[np.ndarray]) -> list[float]:
        with torch.inference_mode():
            ids, mask, lengths = pad_right(rows, self._pad_id, self.loaded.device)
            return sequence_scores(self.loaded.model, ids, mask, lengths).cpu().tolist()


def import_function(spec: str) -> Callable[..., float]:
    """Imports ``module:function``; raises ValueError naming what is wrong."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import scorer function {spec!r}: {err}") from err
    if not callable(fn):
        raise ValueError(f"scorer function {spec!r} is not callable")
    return fn


class FunctionScorer:
    """A Python callable ``f(prompt, response, label) -> float`` (rule-based rewards)."""

    kind = "function"

    def __init__(self, name: str, spec: str, settings: BatchingServerSettings, metrics) -> None:
        self.name = name
        self.function = spec
        self.max_length = settings.max_sequence_length
        self._fn = import_function(spec)
        self.batcher = _batcher(name, self._run, settings, metrics, tokens=False)

    def start(self) -> None:
        self.batcher.start()

    def check_capacity(self, count: int) -> None:
        self.batcher.check_capacity(count)

    async def stop(self) -> None:
        await self.batcher.stop()

    def _call(self, item: ScoreInput) -> float | Exception:
        try:
            value = float(self._fn(item.prompt, item.response, item.label))
        except (ValueError, TypeError, KeyError) as err:
            return InvalidArgument(item.response_field, f"scorer {self.name!r} rejected it: {err}")
        except Exception as err:  # a failing scorer fails its own items only
            return RuntimeError(f"scorer {self.name!r} failed: {err!r}")
        if not math.isfinite(value):
            return RuntimeError(f"scorer {self.name!r} returned {value} for {item.response_field}")
        return value

    def _run(self, inputs: list[ScoreInput]) -> list[float | Exception]:
        return [self._call(item) for item in inputs]

    async def score(
        self, inputs: Sequence[ScoreInput], deadline: float | None, isolated: bool = False
    ) -> np.ndarray:
        limit = max_text_bytes(self.max_length)  # the bound a model scorer's tokenizer applies
        for item in inputs:
            check_text(item.response, item.response_field, limit)
            texts = [item.prompt] if isinstance(item.prompt, str) else item.prompt
            for text in texts:
                check_text(text if isinstance(text, str) else text["content"],
                           item.prompt_field, limit)  # fmt: skip
        results = await self.batcher.submit(inputs, [1] * len(inputs), deadline, isolated=isolated)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return np.asarray(results, dtype=np.float32)


def load_scorers(settings, metrics: BatcherMetrics) -> dict[str, Scorer]:
    """Builds every configured scorer (loading models; call off the event loop)."""
    specs: list[tuple[str, str, str]] = []
    if settings.model.lower() != "none":
        specs.append(("default", "model", settings.model))
    for entry in settings.scorers:
        name, _, rest = entry.partition("=")
        kind, _, target = rest.partition(":")
        specs.append((name, kind, target))
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"scorer names must be unique, got {names}")
    if settings.default_scorer not in names:
        raise ValueError(f"default_scorer {settings.default_scorer!r} is not one of {names}")
    scorers: dict[str, Scorer] = {}
    for name, kind, target in specs:
        if kind == "model":
            loaded = load_sequence_classifier(
                resolve_model(target), dtype=settings.dtype, device=settings.device
            )
            scorers[name] = ModelScorer(name, loaded, settings, metrics)
        else:
            scorers[name] = FunctionScorer(name, target, settings, metrics)
    return scorers
