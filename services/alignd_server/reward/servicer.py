"""RewardService servicer: proto <-> domain only."""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
from grpc import aio
from prometheus_client import Counter, Histogram

from alignd.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from alignd_server.common.batching import TIME_BUCKETS, BatcherMetrics, deadline_of
from alignd_server.common.errors import (
    AligndError,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from alignd_server.common.holder import in_daemon_thread
from alignd_server.common.info import model_info, server_info
from alignd_server.common.metrics import ServerMetrics
from alignd_server.common.tokenization import check_text, max_text_bytes
from alignd_server.reward.config import RewardSettings
from alignd_server.reward.scorers import (
    EnsembleScorer,
    ModelScorer,
    PromptValue,
    ScoreInput,
    Scorer,
    load_scorers,
)

log = logging.getLogger(__name__)

SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


def _prompt(item: reward_pb2.ScoreItem | reward_pb2.CompareItem, field: str) -> PromptValue:
    kind = item.WhichOneof("prompt_kind")
    if kind == "prompt":
        if not item.prompt:
            raise InvalidArgument(f"{field}.prompt", "must not be empty")
        return item.prompt
    if kind == "chat":
        if not item.chat.messages:
            raise InvalidArgument(f"{field}.chat.messages", "must not be empty")
        for j, message in enumerate(item.chat.messages):
            if not message.role or not message.content:
                raise InvalidArgument(f"{field}.chat.messages[{j}]", "role and content must be set")
        return [{"role": m.role, "content": m.content} for m in item.chat.messages]
    raise InvalidArgument(field, "prompt or chat must be set")


def _label(item, field: str, limit: int) -> str | None:
    return check_text(item.label, field, limit) if item.HasField("label") else None


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """Scores with the configured scorers, each behind a dynamic batcher."""

    name = SERVICE

    def __init__(self, settings: RewardSettings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.scorers: dict[str, Scorer] = {}
        self._loading = False
        self._metrics = BatcherMetrics(metrics.registry)
        self._requests = Counter(
            "alignd_reward_scorer_requests",
            "Score, Compare and ModelInfer requests by scorer and outcome.",
            ["scorer", "method", "code"], registry=metrics.registry,
        )  # fmt: skip
        self._items = Counter(
            "alignd_reward_scorer_items", "Items scored by scorer (a Compare item counts twice).",
            ["scorer"], registry=metrics.registry,
        )  # fmt: skip
        self._seconds = Histogram(
            "alignd_reward_scorer_seconds", "Seconds from a request's arrival to its scores.",
            ["scorer", "method"], buckets=TIME_BUCKETS, registry=metrics.registry,
        )  # fmt: skip

    @contextlib.contextmanager
    def measured(self, scorer: Scorer, method: str, items: int):
        """Counts a request of ``scorer`` by its status code, its items when it succeeds, and
        its seconds."""
        start, code = time.perf_counter(), "OK"
        try:
            yield
        except AligndError as err:
            code = err.code.name
            raise
        except BaseException:
            code = "CANCELLED"  # the caller went away (or the server is stopping)
            raise
        else:
            self._items.labels(scorer.name).inc(items)
        finally:
            self._requests.labels(scorer.name, method, code).inc()
            self._seconds.labels(scorer.name, method).observe(time.perf_counter() - start)

    def register(self, server: aio.Server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self, server)

    def companions(self) -> list:
        """The services hosted beside this one on its server: the Open Inference Protocol's
        (:mod:`alignd_server.reward.inference`), over the same scorers."""
        from alignd_server.reward.inference import InferenceServicer

        return [InferenceServicer(self)]

    async def start(self) -> None:
        self._loading = True
        try:
            scorers = await in_daemon_thread(lambda: load_scorers(self.settings, self._metrics))
        finally:
            self._loading = False
        for scorer in scorers.values():
            scorer.start()
            log.info("scorer %s (%s) ready", scorer.name, scorer.kind)
        self.scorers = scorers

    async def stop(self) -> None:
        for scorer in self.scorers.values():
            await scorer.stop()

    def _scorer(self, name: str) -> Scorer:
        if not self.scorers:
            if self._loading:
                raise Unavailable("the scorers are still loading")
            raise FailedPrecondition("no scorer is loaded")
        chosen = name or self.settings.default_scorer
        if chosen not in self.scorers:
            known = ", ".join(sorted(self.scorers))
            raise InvalidArgument("scorer", f"unknown scorer {chosen!r}; this server has {known}")
        return self.scorers[chosen]

    def check_count(self, count: int) -> None:
        if count == 0:
            raise InvalidArgument("items", "must not be empty")
        if count > self.settings.max_batch_size:
            raise InvalidArgument(
                "items", f"{count} items exceed max_batch_size {self.settings.max_batch_size}"
            )

    async def Score(self, request: reward_pb2.ScoreRequest, context) -> reward_pb2.ScoreResponse:
        scorer = self._scorer(request.scorer)
        with self.measured(scorer, "Score", len(request.items)):
            return await self._score(scorer, request, context)

    async def _score(self, scorer: Scorer, request, context) -> reward_pb2.ScoreResponse:
        self.check_count(len(request.items))
        scorer.check_capacity(len(request.items))  # a refusal costs no tokenization
        limit = max_text_bytes(scorer.max_length)
        inputs = [
            ScoreInput(
                _prompt(item, f"items[{i}]"),
                item.response,  # may be empty: a completion that ended at once
                _label(item, f"items[{i}].label", limit),
                f"items[{i}].prompt",
                f"items[{i}].response",
            )
            for i, item in enumerate(request.items)
        ]
        if request.return_members:
            if not isinstance(scorer, EnsembleScorer):
                raise InvalidArgument("return_members", f"scorer {scorer.name!r} is a "
                                      f"{scorer.kind} scorer, not an ensemble")  # fmt: skip
            members = await scorer.member_scores(inputs, deadline_of(context), request.isolated)
            return reward_pb2.ScoreResponse(
                scores=scorer.combine(members).tolist(), scorer=scorer.name,
                members=[reward_pb2.MemberScores(scorer=m.name, scores=row.tolist())
                         for m, row in zip(scorer.members, members, strict=True)],
                std=scorer.spread(members).tolist(),
            )  # fmt: skip
        scores = await scorer.score(inputs, deadline_of(context), request.isolated)
        return reward_pb2.ScoreResponse(scores=scores.tolist(), scorer=scorer.name)

    async def Compare(
        self, request: reward_pb2.CompareRequest, context
    ) -> reward_pb2.CompareResponse:
        scorer = self._scorer(request.scorer)
        with self.measured(scorer, "Compare", 2 * len(request.items)):
            return await self._compare(scorer, request, context)

    async def _compare(self, scorer: Scorer, request, context) -> reward_pb2.CompareResponse:
        self.check_count(len(request.items))
        scorer.check_capacity(2 * len(request.items))
        limit = max_text_bytes(scorer.max_length)
        inputs = []
        for side in ("a", "b"):
            for i, item in enumerate(request.items):
                field = f"items[{i}].response_{side}"
                response = getattr(item, f"response_{side}")
                inputs.append(
                    ScoreInput(
                        _prompt(item, f"items[{i}]"),
                        response,
                        _label(item, f"items[{i}].label", limit),
                        f"items[{i}].prompt",
                        field,
                    )
                )
        scores = await scorer.score(inputs, deadline_of(context), request.isolated)
        count = len(request.items)
        a, b = scores[:count].astype(np.float64), scores[count:].astype(np.float64)
        probabilities = 0.5 * (1.0 + np.tanh(0.5 * (a - b)))  # sigmoid(a - b), overflow-free
        return reward_pb2.CompareResponse(
            probabilities=probabilities.tolist(),
            scores_a=a.tolist(),
            scores_b=b.tolist(),
            scorer=scorer.name,
        )

    async def GetInfo(self, request: common_pb2.GetInfoRequest, context) -> reward_pb2.RewardInfo:
        default = self._scorer("")
        loaded = default.loaded if isinstance(default, ModelScorer) else None
        info = server_info(
            SERVICE, self.settings, self.started_at, loaded,
            max_batch_tokens=self.settings.max_batch_tokens,
        )  # fmt: skip
        scorers = []
        for scorer in self.scorers.values():
            limits = common_pb2.Limits()
            limits.CopyFrom(info.limits)
            limits.max_sequence_length = scorer.max_length
            limits.max_text_bytes = max_text_bytes(scorer.max_length)
            entry = reward_pb2.ScorerInfo(
                name=scorer.name, limits=limits, is_default=scorer is default
            )
            if isinstance(scorer, ModelScorer):
                norm = scorer.normalization
                entry.kind = reward_pb2.SCORER_KIND_MODEL
                entry.format = scorer.format
                entry.model.CopyFrom(model_info(scorer.loaded))
                entry.normalization.CopyFrom(
                    reward_pb2.ScoreNormalization(
                        offset=norm.offset,
                        scale=norm.scale,
                        clip_min=norm.clip_min,
                        clip_max=norm.clip_max,
                    )
                )
            elif isinstance(scorer, EnsembleScorer):
                entry.kind = reward_pb2.SCORER_KIND_ENSEMBLE
                entry.ensemble.CopyFrom(reward_pb2.EnsembleInfo(
                    members=[m.name for m in scorer.members], aggregate=scorer.aggregate,
                    k=scorer.k,
                ))  # fmt: skip
                entry.normalization.scale = 1.0
            else:
                entry.kind = reward_pb2.SCORER_KIND_FUNCTION
                entry.function = scorer.function
                entry.normalization.scale = 1.0
            scorers.append(entry)
        return reward_pb2.RewardInfo(server=info, scorers=scorers)
