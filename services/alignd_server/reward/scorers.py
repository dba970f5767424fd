"""Scorers: reward models and Python functions, each behind its own dynamic batcher.

A model scorer encodes (prompt, response) in its input format, batches items across requests,
and returns the raw head output after the model's normalisation. The format is how the model
was trained to read an item, so that it scores as it was trained:

* ``alignd`` — what alignd's trainer trains on: the prompt as the trainer's tokenization
  builds it (a chat through the chat template with its generation prompt), then the response's
  tokens and the end token, token types all 0; decoders are read at the last token.
* ``pair`` — the tokenizer's text-pair encoding, ``tokenizer(prompt, response)`` with the
  ``token_type_ids`` it returns (encoder reward models: BERT, DeBERTa and kin).
* ``concat`` — prompt and response as one text with the end token appended when missing,
  ``tokenizer(prompt + response + eos)`` (TRL ``RewardTrainer``'s plain-text convention).
* ``chat`` — the conversation with the response as the assistant's turn,
  ``apply_chat_template(messages)`` (TRL's conversational convention; decoder reward models).

In ``pair`` and ``concat`` a chat prompt is first rendered as text (:func:`render_chat`). The
last three run the model's own forward (transformers pools a decoder at the rightmost token
that is not the pad token, as it did in training). The format comes from ``--scorers
NAME=model:PATH:FORMAT`` (``--model-format`` for the default model), else the ``format`` of the
model's ``alignd_reward.json`` (the trainer writes ``alignd`` into the reward models it saves),
else :func:`default_format`: ``pair`` for encoders, ``chat`` for decoders with a chat
template, ``concat`` for the rest. A function scorer
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
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, ValidationError

from alignd.models import resolve_model
from alignd_server.common.batching import BatcherMetrics, DynamicBatcher
from alignd_server.common.config import BatchingServerSettings
from alignd_server.common.errors import InvalidArgument
from alignd_server.common.forward import pad_right, pools_last_token, sequence_scores
from alignd_server.common.models import REWARD_CARD, LoadedModel, load_sequence_classifier
from alignd_server.common.tokenization import (
    check_text,
    max_text_bytes,
    render_chat,
    tokenize,
)
from alignd_server.reward.config import FORMATS, ScorerSpec, parse_scorer

NORMALIZATION_FILE = REWARD_CARD

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
    """Added to the raw score first."""
    scale: float = 1.0
    """Multiplies the shifted score."""
    clip_min: float | None = None
    """Lower clip bound of the normalised score (none when unset)."""
    clip_max: float | None = None
    """Upper clip bound of the normalised score (none when unset)."""

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """(N,) raw scores -> (N,) float32 normalised scores."""
        scores = self.scale * (raw.astype(np.float64) + self.offset)
        if self.clip_min is not None or self.clip_max is not None:
            scores = np.clip(scores, self.clip_min, self.clip_max)
        return scores.astype(np.float32)


class RewardCard(Normalization):
    """``alignd_reward.json`` beside a reward model: its normalisation and the input format it
    was trained with. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    format: str | None = None
    """The input format the model was trained with (one of :data:`FORMATS`)."""

    @classmethod
    def for_model(cls, path: Path) -> RewardCard:
        """The card of the model at ``path`` (defaults when it has none).

        Raises:
            ValueError: the file is not valid JSON, has unknown keys or bad values.
        """
        file = path / NORMALIZATION_FILE
        if not file.exists():
            return cls()
        try:
            card = cls.model_validate(json.loads(file.read_text()))
        except (ValueError, ValidationError) as err:
            raise ValueError(f"{file}: {err}") from None
        if card.format is not None and card.format not in FORMATS:
            raise ValueError(f"{file}: format {card.format!r} is not one of {', '.join(FORMATS)}")
        return card


def default_format(loaded: LoadedModel) -> str:
    """The format of a reward model that names none: ``pair`` for an encoder, ``chat`` for a
    decoder with a chat template, else ``concat``."""
    if not pools_last_token(loaded.model):
        return "pair"
    return "chat" if loaded.has_chat_template else "concat"


def resolve_format(loaded: LoadedModel, requested: str | None, card: RewardCard, name: str) -> str:
    """The scorer's format: ``requested``, else the model's ``card``'s, else
    :func:`default_format`.

    Raises:
        ValueError: an unknown format, or ``chat`` for a tokenizer without a chat template.
    """
    chosen = requested or card.format or default_format(loaded)
    if chosen not in FORMATS:
        raise ValueError(f"scorer {name!r}: format {chosen!r} is not one of {', '.join(FORMATS)}")
    if chosen == "chat" and not loaded.has_chat_template:
        raise ValueError(f"scorer {name!r}: format chat needs a chat template, and "
                         f"{loaded.path}'s tokenizer has none; use pair or concat")  # fmt: skip
    return chosen


@dataclass(frozen=True)
class Encoded:
    """One item's model input: token ids and, where the format has them, token types."""

    ids: np.ndarray
    types: np.ndarray | None


class Scorer(Protocol):
    """Scores batches of (prompt, response) items."""

    name: str
    kind: str  # "model", "function" or "ensemble"
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
    """A one-label sequence classifier, reading items in its input ``format``."""

    kind = "model"

    def __init__(
        self, name: str, loaded: LoadedModel, settings: BatchingServerSettings, metrics,
        format: str | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.loaded = loaded
        self.settings = settings
        card = RewardCard.for_model(Path(loaded.path))
        self.format = resolve_format(loaded, format, card, name)
        self.normalization: Normalization = card
        self.max_length = loaded.sequence_limit(settings.max_sequence_length)
        self._pad_id = loaded.tokenizer.pad_token_id
        self.batcher = _batcher(name, self._run, settings, metrics, tokens=True)

    def start(self) -> None:
        self.batcher.start()

    def check_capacity(self, count: int) -> None:
        self.batcher.check_capacity(count)

    async def stop(self) -> None:
        await self.batcher.stop()

    def tokenize(self, inputs: Sequence[ScoreInput]) -> list[Encoded]:
        """Each item in the scorer's format; over-long items are rejected, naming their
        fields."""
        if self.format == "alignd":
            return [Encoded(tokenize(
                self.loaded.tokenizer, item.prompt, item.response, max_length=self.max_length,
                field=item.prompt_field, completion_field=item.response_field,
            ).input_ids, None) for item in inputs]  # fmt: skip
        return [self._encode(item) for item in inputs]

    def _encode(self, item: ScoreInput) -> Encoded:
        tokenizer, limit = self.loaded.tokenizer, max_text_bytes(self.max_length)
        response = check_text(item.response, item.response_field, limit)
        if self.format == "chat":
            prompt = item.prompt
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            render_chat(tokenizer, messages, item.prompt_field, limit)  # checks every message
            messages = [*messages, {"role": "assistant", "content": response}]
            try:
                encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
            except TemplateError as err:
                raise InvalidArgument(
                    item.prompt_field, f"the chat template rejected this conversation: {err}"
                ) from None
        else:
            prompt = item.prompt
            if not isinstance(prompt, str):
                prompt = render_chat(tokenizer, prompt, item.prompt_field, limit)
            check_text(prompt, item.prompt_field, limit)
            if self.format == "pair":
                encoded = tokenizer(prompt, response)
            else:
                text, eos = prompt + response, tokenizer.eos_token
                if eos and not text.endswith(eos):
                    text += eos
                encoded = tokenizer(text)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        if ids.size > self.max_length:
            raise InvalidArgument(item.prompt_field,
                                  f"{ids.size} tokens ({self.format} format of prompt and "
                                  f"response) exceed max_length {self.max_length}")  # fmt: skip
        types = encoded.get("token_type_ids")
        return Encoded(ids, None if types is None else np.asarray(types, dtype=np.int64))

    async def score(
        self, inputs: Sequence[ScoreInput], deadline: float | None, isolated: bool = False
    ) -> np.ndarray:
        rows = await asyncio.to_thread(self.tokenize, inputs)
        raw = await self.batcher.submit(rows, [r.ids.size for r in rows], deadline,
                                        isolated=isolated)  # fmt: skip
        return self.normalization.apply(np.asarray(raw, dtype=np.float32))

    def _run(self, rows: list[Encoded]) -> list[float]:
        device = self.loaded.device
        with torch.inference_mode():
            ids, mask, lengths = pad_right([r.ids for r in rows], self._pad_id, device)
            if self.format == "alignd":
                return sequence_scores(self.loaded.model, ids, mask, lengths).cpu().tolist()
            extra = {}
            if any(r.types is not None for r in rows):
                types = [r.types if r.types is not None else np.zeros_like(r.ids) for r in rows]
                extra["token_type_ids"] = pad_right(types, 0, device)[0]
            logits = self.loaded.model(input_ids=ids, attention_mask=mask, **extra).logits
            return logits[:, 0].float().cpu().tolist()


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


class EnsembleScorer:
    """Other scorers' scores of the same items, combined (``aggregate``): their ``mean``,
    their ``min``, or ``mean_minus_std`` = mean − k · std, std the members' population
    standard deviation (ddof 0) — the uncertainty-penalised objective of Coste et al. 2023,
    "Reward Model Ensembles Help Mitigate Overoptimization" (its "UWO" penalises the variance
    instead; ``k`` weighs the standard deviation here). Members score after their own
    normalisation. One request goes to every member at once (each member's batcher takes its
    items with its own batching); a member's error fails the request and cancels the rest."""

    kind = "ensemble"

    def __init__(self, name: str, members: Sequence[Scorer], aggregate: str, k: float) -> None:
        self.name = name
        self.members = list(members)
        self.aggregate = aggregate
        self.k = k
        self.max_length = min(m.max_length for m in self.members)

    def start(self) -> None:
        """Nothing to start: the members are scorers of their own."""

    async def stop(self) -> None:
        """Nothing to stop (see :meth:`start`)."""

    def check_capacity(self, count: int) -> None:
        for member in self.members:
            member.check_capacity(count)

    async def member_scores(
        self, inputs: Sequence[ScoreInput], deadline: float | None, isolated: bool = False
    ) -> np.ndarray:
        """(M, N) float32: each member's scores of ``inputs``, members in order."""
        tasks = [asyncio.ensure_future(m.score(inputs, deadline, isolated)) for m in self.members]
        try:
            return np.stack(await asyncio.gather(*tasks))
        except BaseException:  # the first member's error is the caller's; drop the rest
            for task in tasks:
                task.cancel()
            raise

    @staticmethod
    def spread(scores: np.ndarray) -> np.ndarray:
        """(M, N) member scores -> (N,) their population standard deviation (ddof 0)."""
        return scores.astype(np.float64).std(axis=0)

    def combine(self, scores: np.ndarray) -> np.ndarray:
        """(M, N) member scores -> (N,) float32 ensemble scores."""
        values = scores.astype(np.float64)
        if self.aggregate == "min":
            return values.min(axis=0).astype(np.float32)
        mean = values.mean(axis=0)
        if self.aggregate == "mean_minus_std":
            mean = mean - self.k * self.spread(scores)
        return mean.astype(np.float32)

    async def score(
        self, inputs: Sequence[ScoreInput], deadline: float | None, isolated: bool = False
    ) -> np.ndarray:
        return self.combine(await self.member_scores(inputs, deadline, isolated))


def load_scorers(settings, metrics: BatcherMetrics) -> dict[str, Scorer]:
    """Builds every configured scorer (loading models; call off the event loop).

    Raises:
        ValueError: duplicate names, an unknown default, an ensemble whose member is missing
            or is an ensemble itself; a model that cannot be loaded or read in its format.
    """
    specs: list[ScorerSpec] = []
    if settings.model.lower() != "none":
        specs.append(ScorerSpec("default", "model", settings.model,
                                format=settings.model_format or None))  # fmt: skip
    for entry in settings.scorers:
        specs.append(parse_scorer(entry))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"scorer names must be unique, got {names}")
    if settings.default_scorer not in names:
        raise ValueError(f"default_scorer {settings.default_scorer!r} is not one of {names}")
    kinds = {s.name: s.kind for s in specs}
    for spec in specs:
        for member in spec.members:
            if member not in kinds:
                raise ValueError(f"ensemble {spec.name!r}: member {member!r} is not one of "
                                 f"{names}")  # fmt: skip
            if kinds[member] == "ensemble":
                raise ValueError(f"ensemble {spec.name!r}: member {member!r} is an ensemble; "
                                 "list its members instead")  # fmt: skip
    scorers: dict[str, Scorer] = {}
    for spec in specs:
        if spec.kind == "model":
            loaded = load_sequence_classifier(
                resolve_model(spec.target), dtype=settings.dtype, device=settings.device
            )
            scorers[spec.name] = ModelScorer(spec.name, loaded, settings, metrics, spec.format)
        elif spec.kind == "function":
            scorers[spec.name] = FunctionScorer(spec.name, spec.target, settings, metrics)
    for spec in specs:
        if spec.kind == "ensemble":
            members = [scorers[m] for m in spec.members]
            scorers[spec.name] = EnsembleScorer(spec.name, members, spec.aggregate, spec.k)
    return {s.name: scorers[s.name] for s in specs}  # in the order they were given
