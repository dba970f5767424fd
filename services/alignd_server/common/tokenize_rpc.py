"""Proto <-> domain conversion of the shared Tokenize RPC and of prompts."""

from __future__ import annotations

import asyncio

import numpy as np

from alignd.tensors import TensorError, from_ragged, to_numpy
from alignd.v1 import common_pb2 as pb
from alignd_server.common.config import ModelServerSettings
from alignd_server.common.errors import InvalidArgument
from alignd_server.common.tokenization import Tokenized, tokenize_batch

TRUNCATION = {
    pb.TRUNCATION_ERROR: "error",
    pb.TRUNCATION_LEFT: "left",
    pb.TRUNCATION_RIGHT: "right",
}


def prompt_from_proto(prompt: pb.Prompt, field: str) -> str | list[dict[str, str]] | np.ndarray:
    """A Prompt message as the tokenizer takes it: text, chat messages or token ids.

    Raises:
        InvalidArgument: the prompt is unset or its token ids are not a 1-D int32 tensor.
    """
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        return prompt.text
    if kind == "chat":
        return [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
    if kind == "token_ids":
        if prompt.token_ids.dtype not in (pb.DTYPE_INT32, pb.DTYPE_INT64):
            raise InvalidArgument(
                f"{field}.token_ids.dtype", "must be DTYPE_INT32 (or DTYPE_INT64)"
            )
        try:
            ids = to_numpy(prompt.token_ids)
        except TensorError as err:
            raise InvalidArgument(f"{field}.token_ids", str(err)) from None
        if ids.ndim != 1:
            raise InvalidArgument(f"{field}.token_ids", f"must be 1-D, got shape {list(ids.shape)}")
        return ids
    raise InvalidArgument(field, "must be set (text, chat or token_ids)")


def validate_tokenize(
    request: pb.TokenizeRequest, *, max_batch_size: int, max_sequence_length: int
) -> tuple[int, str, bool]:
    """Checks the request's batch and options; returns (max_length, truncation, append_eos)."""
    count = len(request.items)
    if count == 0:
        raise InvalidArgument("items", "must not be empty")
    if count > max_batch_size:
        raise InvalidArgument("items", f"{count} items exceed max_batch_size {max_batch_size}")
    max_length = request.max_length or max_sequence_length
    if not 1 <= max_length <= max_sequence_length:
        raise InvalidArgument(
            "max_length", f"{request.max_length} is outside [1, {max_sequence_length}]"
        )
    if request.truncation not in TRUNCATION:
        raise InvalidArgument("truncation", f"unknown value {request.truncation}")
    append_eos = request.append_eos if request.HasField("append_eos") else True
    return max_length, TRUNCATION[request.truncation], append_eos


def tokenize(
    request: pb.TokenizeRequest, tokenizer, *, max_batch_size: int, max_sequence_length: int
) -> pb.TokenizeResponse:
    """Serves a TokenizeRequest with ``tokenizer`` under the server's limits."""
    max_length, truncation, append_eos = validate_tokenize(
        request, max_batch_size=max_batch_size, max_sequence_length=max_sequence_length
    )
    items = [
        (
            prompt_from_proto(item.prompt, f"items[{i}].prompt"),
            item.completion if item.HasField("completion") else None,
        )
        for i, item in enumerate(request.items)
    ]
    results = tokenize_batch(
        tokenizer, items, max_length=max_length, truncation=truncation, append_eos=append_eos
    )
    return tokenized_to_proto(results)


def tokenized_to_proto(results: list[Tokenized]) -> pb.TokenizeResponse:
    """Packs tokenized rows into a TokenizeResponse."""
    return pb.TokenizeResponse(
        input_ids=from_ragged([r.input_ids for r in results], pb.DTYPE_INT32),
        prompt_lengths=[r.prompt_length for r in results],
        loss_mask=from_ragged([r.loss_mask for r in results], pb.DTYPE_UINT8),
        truncated=[r.truncated for r in results],
    )


async def serve_tokenize(
    request: pb.TokenizeRequest, tokenizer, settings: ModelServerSettings
) -> pb.TokenizeResponse:
    """The Tokenize RPC of a policy-side service, run off the event loop."""
    return await asyncio.to_thread(
        tokenize,
        request,
        tokenizer,
        max_batch_size=settings.max_batch_size,
        max_sequence_length=settings.max_sequence_length,
    )
