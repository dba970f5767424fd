"""Client of the RewardService: score and compare (prompt, response) pairs."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from alignd.clients.base import AsyncClientBase, ClientBase
from alignd.errors import from_rpc_error
from alignd.v1 import common_pb2, reward_pb2, reward_pb2_grpc

SERVICE = "alignd.v1.RewardService"

#: A reward prompt: plain text or chat turns (``{"role", "content"}`` dicts).
RewardPrompt = str | Sequence[Mapping[str, str]]


def _set_prompt(item, prompt: RewardPrompt) -> None:
    if isinstance(prompt, str):
        item.prompt = prompt
    else:
        item.chat.messages.extend(
            common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt
        )


def _check_lengths(**columns: Sequence | None) -> int:
    sizes = {k: len(v) for k, v in columns.items() if v is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"arguments differ in length: {sizes}")
    return next(iter(sizes.values()))


def _concat(responses: Sequence, field: str) -> np.ndarray:
    """(N,) float32 of one repeated float field across chunk responses."""
    parts = [np.asarray(getattr(r, field), dtype=np.float32) for r in responses]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class EnsembleScores:
    """An ensemble scorer's answer with its members' scores (``score_members``)."""

    scores: np.ndarray
    """(N,) float32 ensemble scores (the aggregate)."""
    std: np.ndarray
    """(N,) float32 standard deviation of the members' scores (ddof 0)."""
    members: dict[str, np.ndarray]
    """(N,) float32 scores of each member, by member name, in the ensemble's order."""


def _ensemble(responses: Sequence[reward_pb2.ScoreResponse]) -> EnsembleScores:
    members: dict[str, list[np.ndarray]] = {}
    for response in responses:
        for member in response.members:
            members.setdefault(member.scorer, []).append(np.asarray(member.scores, np.float32))
    return EnsembleScores(
        scores=_concat(responses, "scores"), std=_concat(responses, "std"),
        members={name: np.concatenate(parts) for name, parts in members.items()},
    )  # fmt: skip


def _chunks(count: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, count)) for i in range(0, count, size)]


def score_requests(
    prompts: Sequence[RewardPrompt],
    responses: Sequence[str],
    labels: Sequence[str | None] | None,
    scorer: str | None,
    chunk: int,
    isolated: bool = False,
    return_members: bool = False,
) -> list[reward_pb2.ScoreRequest]:
    """ScoreRequests of at most ``chunk`` items covering all pairs, in order."""
    count = _check_lengths(prompts=prompts, responses=responses, labels=labels)
    requests = []
    for part in _chunks(count, chunk):
        request = reward_pb2.ScoreRequest(
            scorer=scorer or "", isolated=isolated, return_members=return_members
        )
        for i in range(part.start, part.stop):
            item = request.items.add(response=responses[i])
            _set_prompt(item, prompts[i])
            if labels is not None and labels[i] is not None:
                item.label = labels[i]
        requests.append(request)
    return requests


def compare_requests(
    prompts: Sequence[RewardPrompt],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    labels: Sequence[str | None] | None,
    scorer: str | None,
    chunk: int,
    isolated: bool = False,
) -> list[reward_pb2.CompareRequest]:
    """CompareRequests of at most ``chunk`` items covering all pairs, in order."""
    count = _check_lengths(prompts=prompts, a=responses_a, b=responses_b, labels=labels)
    requests = []
    for part in _chunks(count, chunk):
        request = reward_pb2.CompareRequest(scorer=scorer or "", isolated=isolated)
        for i in range(part.start, part.stop):
            item = request.items.add(response_a=responses_a[i], response_b=responses_b[i])
            _set_prompt(item, prompts[i])
            if labels is not None and labels[i] is not None:
                item.label = labels[i]
        requests.append(request)
    return requests


class RewardClient(ClientBase):
    """Sync client of the reward service. Large batches are split to the server's limit and
    sent concurrently."""

    service = SERVICE
    stub_class = reward_pb2_grpc.RewardServiceStub
    _max_batch: int | None = None

    def info(self, *, timeout: float | None = None) -> reward_pb2.RewardInfo:
        """Scorers, their models and limits."""
        return self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)

    def _chunk(self) -> int:
        if self._max_batch is None:
            self._max_batch = self.info().server.limits.max_batch_size or 64
        return self._max_batch

    def _fan_out(self, method: str, requests: list, timeout: float | None) -> list:
        futures = [
            getattr(self._stub, method).future(r, timeout=timeout or self.timeout) for r in requests
        ]
        try:
            return [f.result() for f in futures]
        except grpc.RpcError as err:
            for f in futures:
                f.cancel()
            raise from_rpc_error(err, f"{self.service}/{method}") from None

    def score(
        self,
        prompts: Sequence[RewardPrompt],
        responses: Sequence[str],
        *,
        scorer: str | None = None,
        labels: Sequence[str | None] | None = None,
        isolated: bool = False,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Scores each (prompt, response).

        Args:
            prompts: plain text, or chat turns rendered with the reward model's template.
            responses: one response per prompt.
            scorer: scorer name (default: the server's default scorer).
            labels: optional reference answers for function scorers.
            isolated: have each request batched only with its own items (bit-identical
                scores whatever else the server does; a job's ``deterministic`` mode).
            timeout: deadline of each request, in seconds.

        Returns:
            (N,) float32 scores.
        """
        requests = score_requests(prompts, responses, labels, scorer, self._chunk(), isolated)
        return _concat(self._fan_out("Score", requests, timeout), "scores")

    def score_members(
        self,
        prompts: Sequence[RewardPrompt],
        responses: Sequence[str],
        *,
        scorer: str | None = None,
        labels: Sequence[str | None] | None = None,
        isolated: bool = False,
        timeout: float | None = None,
    ) -> EnsembleScores:
        """Scores each (prompt, response) with an ensemble scorer, and returns its members'
        scores and their spread too (arguments as :meth:`score`; a scorer that is not an
        ensemble is INVALID_ARGUMENT)."""
        requests = score_requests(prompts, responses, labels, scorer, self._chunk(), isolated,
                                  return_members=True)  # fmt: skip
        return _ensemble(self._fan_out("Score", requests, timeout))

    def compare(
        self,
        prompts: Sequence[RewardPrompt],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
        *,
        scorer: str | None = None,
        labels: Sequence[str | None] | None = None,
        isolated: bool = False,
        timeout: float | None = None,
    ) -> np.ndarray:
        """(N,) float32 P(a > b) = sigmoid(r_a - r_b) for each pair."""
        requests = compare_requests(
            prompts, responses_a, responses_b, labels, scorer, self._chunk(), isolated
        )
        return _concat(self._fan_out("Compare", requests, timeout), "probabilities")


class AsyncRewardClient(AsyncClientBase):
    """asyncio client of the reward service (see :class:`RewardClient`)."""

    service = SERVICE
    stub_class = reward_pb2_grpc.RewardServiceStub
    _max_batch: int | None = None

    async def info(self, *, timeout: float | None = None) -> reward_pb2.RewardInfo:
        """Scorers, their models and limits."""
        return await self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)

    async def _chunk(self) -> int:
        if self._max_batch is None:
            self._max_batch = (await self.info()).server.limits.max_batch_size or 64
        return self._max_batch

    async def score(
        self,
        prompts: Sequence[RewardPrompt],
        responses: Sequence[str],
        *,
        scorer: str | None = None,
        labels: Sequence[str | None] | None = None,
        isolated: bool = False,
        timeout: float | None = None,
    ) -> np.ndarray:
        """See :meth:`RewardClient.score`."""
        requests = score_requests(prompts, responses, labels, scorer, await self._chunk(), isolated)
        answers = await asyncio.gather(*(self._call("Score", r, timeout=timeout) for r in requests))
        return _concat(answers, "scores")

    async def score_members(
        self,
        prompts: Sequence[RewardPrompt],
        responses: Sequence[str],
        *,
        scorer: str | None = None,
        labels: Sequence[str | None] | None = None,
        isolated: bool = False,
        timeout: float | None = None,
    ) -> EnsembleScores:
        """See :meth:`RewardClient.score_members`."""
        requests = score_requests(prompts, responses, labels, scorer, await self._chunk(),
                                  isolated, return_members=True)  # fmt: skip
        answers = await asyncio.gather(*(self._call("Score", r, timeout=timeout) for r in requests))
        return _ensemble(answers)

    async def compare(
        self,
        prompts: Sequence[RewardPrompt],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
        *,
        scorer: str | None = None,
        labels: Sequence[str | None] | None = None,
        isolated: bool = False,
        timeout: float | None = None,
    ) -> np.ndarray:
        """See :meth:`RewardClient.compare`."""
        chunk = await self._chunk()
        requests = compare_requests(
            prompts, responses_a, responses_b, labels, scorer, chunk, isolated
        )
        answers = await asyncio.gather(
            *(self._call("Compare", r, timeout=timeout) for r in requests)
        )
        return _concat(answers, "probabilities")
