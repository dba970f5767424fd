"""Request building and response parsing of the shared Tokenize RPC."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from alignd.clients.base import AsyncClientBase, ClientBase
from alignd.tensors import from_numpy, to_ragged
from alignd.v1 import common_pb2 as pb

#: A prompt: plain text, chat turns (``{"role", "content"}`` dicts) or token ids.
PromptLike = str | Sequence[Mapping[str, str]] | np.ndarray

_TRUNCATION = {
    "error": pb.TRUNCATION_ERROR,
    "left": pb.TRUNCATION_LEFT,
    "right": pb.TRUNCATION_RIGHT,
}


@dataclass(frozen=True)
class TokenizedSequence:
    """One tokenized (prompt, completion).

    Attributes:
        input_ids: (T,) int32 prompt tokens then completion tokens.
        prompt_length: number of prompt tokens; the completion is ``input_ids[prompt_length:]``.
        loss_mask: (T,) uint8, 1 on completion tokens.
        truncated: whether the server truncated the sequence.
    """

    input_ids: np.ndarray
    prompt_length: int
    loss_mask: np.ndarray
    truncated: bool


def prompt_to_proto(prompt: PromptLike) -> pb.Prompt:
    """Builds a Prompt message from text, chat turns or token ids."""
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    if isinstance(prompt, np.ndarray):
        return pb.Prompt(token_ids=from_numpy(prompt.astype(np.int32, copy=False)))
    if prompt and all(isinstance(t, int | np.integer) for t in prompt):
        return pb.Prompt(token_ids=from_numpy(np.asarray(prompt, dtype=np.int32)))
    turns = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt]
    return pb.Prompt(chat=pb.Conversation(messages=turns))


def tokenize_request(
    prompts: Sequence[PromptLike],
    completions: Sequence[str | None] | None = None,
    *,
    max_length: int = 0,
    truncation: Literal["error", "left", "right"] = "error",
    append_eos: bool = True,
) -> pb.TokenizeRequest:
    """Builds a TokenizeRequest; ``completions`` (if given) pairs up with ``prompts``."""
    if completions is not None and len(completions) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if truncation not in _TRUNCATION:
        raise ValueError(f"truncation must be one of {sorted(_TRUNCATION)}, got {truncation!r}")
    items = []
    for i, prompt in enumerate(prompts):
        item = pb.TokenizeItem(prompt=prompt_to_proto(prompt))
        if completions is not None and completions[i] is not None:
            item.completion = completions[i]
        items.append(item)
    return pb.TokenizeRequest(
        items=items,
        max_length=max_length,
        truncation=_TRUNCATION[truncation],
        append_eos=append_eos,
    )


def tokenize_response(response: pb.TokenizeResponse) -> list[TokenizedSequence]:
    """Unpacks a TokenizeResponse into one :class:`TokenizedSequence` per item."""
    ids = to_ragged(response.input_ids)
    masks = to_ragged(response.loss_mask)
    return [
        TokenizedSequence(i, int(p), m, bool(t))
        for i, p, m, t in zip(ids, response.prompt_lengths, masks, response.truncated, strict=True)
    ]


class TokenizingClient(ClientBase):
    """A sync client of a policy-side service, which exposes the shared Tokenize RPC."""

    def tokenize(
        self,
        prompts: Sequence[PromptLike],
        completions: Sequence[str | None] | None = None,
        *,
        max_length: int = 0,
        truncation: Literal["error", "left", "right"] = "error",
        append_eos: bool = True,
        timeout: float | None = None,
    ) -> list[TokenizedSequence]:
        """Tokenizes prompts (and completions) with the service's tokenizer and chat template.

        Args:
            prompts: text (no chat template), chat turns (rendered with the chat template and
                the assistant generation prompt) or token ids (passed through).
            completions: the assistant responses, one per prompt (None = prompt only).
            max_length: most tokens per sequence; 0 = the server's limit.
            truncation: what to do with longer sequences: ``error``, ``left`` (drop prompt
                tokens from the start) or ``right``.
            append_eos: end each completion with the end-of-sequence token.
            timeout: deadline in seconds (default: the client's).
        """
        request = tokenize_request(
            prompts,
            completions,
            max_length=max_length,
            truncation=truncation,
            append_eos=append_eos,
        )
        return tokenize_response(self._call("Tokenize", request, timeout=timeout))


class AsyncTokenizingClient(AsyncClientBase):
    """The asyncio twin of :class:`TokenizingClient`."""

    async def tokenize(
        self,
        prompts: Sequence[PromptLike],
        completions: Sequence[str | None] | None = None,
        *,
        max_length: int = 0,
        truncation: Literal["error", "left", "right"] = "error",
        append_eos: bool = True,
        timeout: float | None = None,
    ) -> list[TokenizedSequence]:
        """See :meth:`TokenizingClient.tokenize`."""
        request = tokenize_request(
            prompts,
            completions,
            max_length=max_length,
            truncation=truncation,
            append_eos=append_eos,
        )
        return tokenize_response(await self._call("Tokenize", request, timeout=timeout))
