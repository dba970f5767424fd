"""Turn a (prompt, completion) request into token ids: the one tokenization of alignd.

Every policy-side service (generation, reference, trainer) tokenizes through :func:`tokenize`
and exposes it as the ``Tokenize`` RPC, so a caller can see exactly which ids a service scores.

A prompt is one of:

* plain text: encoded with the tokenizer's own special tokens (e.g. a BOS), no chat template;
* a chat, a list of ``{"role", "content"}`` messages: rendered with the tokenizer's chat
  template with ``add_generation_prompt=True``, then encoded without adding special tokens
  (the template already writes them). A tokenizer without a chat template (an encoder reward
  model such as MiniLM) reads the messages' contents joined by newlines, as plain text, so a
  reward model is trained and served on the same layout;
* token ids: passed through after checking them against the vocabulary.

The completion is encoded on its own (no special tokens) and appended to the prompt's ids,
followed by the end token. The whole conversation is deliberately *not* re-rendered with the
completion as an assistant message: generation samples the completion right after the rendered
prompt and stops at the end token, so ``prompt ids + completion ids + eos`` is exactly the
sequence the policy produced and whose log-probabilities it must score. Re-rendering could
tokenize differently at the boundary and adds template text (such as a trailing newline after
``<|im_end|>``) that the policy never generated.

Errors in a request raise :class:`~alignd_server.common.errors.InvalidArgument` naming the
offending field, e.g. ``items[2].prompt: 3000 tokens exceed max_length 2048``.

Texts are bounded before they are tokenized: a text (a prompt, a completion, or a chat's
messages together) of more than :data:`TEXT_BYTES_PER_TOKEN` UTF-8 bytes per allowed token is
refused without being read, so an oversized request costs what its limit allows, not what its
sender chose. (Asking the tokenizer to truncate would not save that work: the fast tokenizers
encode the whole text before they truncate. Within the byte bound the whole text is encoded,
which keeps the token counts in errors exact.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from jinja2 import TemplateError

from alignd_server.common.errors import InvalidArgument

Prompt = str | Sequence[Mapping[str, str]] | Sequence[int] | np.ndarray
Completion = str | Sequence[int] | np.ndarray | None
Truncation = Literal["error", "left", "right"]
TRUNCATIONS: tuple[str, ...] = ("error", "left", "right")
TEXT_BYTES_PER_TOKEN = 32
"""Bytes of text allowed per token of ``max_length``: far above what a tokenizer packs into a
token of real text (about 4), so only texts that could not fit are refused unread."""


MIN_TEXT_TOKENS = 2048
"""Short limits still admit texts of this many tokens' worth of bytes (64 KiB), so that a
request asking for truncation to a few tokens can send an ordinary text."""


def max_text_bytes(max_length: int) -> int:
    """The most UTF-8 bytes of text tokenized for a sequence of ``max_length`` tokens."""
    return max(max_length, MIN_TEXT_TOKENS) * TEXT_BYTES_PER_TOKEN


def check_text(text: str, field: str, limit: int) -> str:
    """``text``, checked to be at most ``limit`` UTF-8 bytes without encoding more than needed.

    Raises:
        InvalidArgument: naming ``field`` and the limit.
    """
    if len(text) > limit or (len(text) * 4 > limit and len(text.encode("utf-8")) > limit):
        raise InvalidArgument(
            field,
            f"is more than {limit} bytes of text ({TEXT_BYTES_PER_TOKEN} per token of max_length)",
        )
    return text


@dataclass(frozen=True)
class Tokenized:
    """One tokenized (prompt, completion) pair.

    Attributes:
        input_ids: ``(T,)`` int32, prompt ids then completion ids (and end token).
        prompt_length: number of leading ids that belong to the prompt.
        loss_mask: ``(T,)`` uint8, 1 on completion ids (including the end token), 0 on the
            prompt.
        truncated: whether ids were dropped to fit ``max_length``.
    """

    input_ids: np.ndarray
    prompt_length: int
    loss_mask: np.ndarray
    truncated: bool


def end_token_id(tokenizer: Any) -> int | None:
    """The id that ends a sequence: the eos token, else the sep token (BERT-style tokenizers).

    Returns:
        The id, or ``None`` when the tokenizer has neither.
    """
    for token_id in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if token_id is not None:
            return int(token_id)
    return None


def _is_chat(prompt: Sequence[Any]) -> bool:
    return len(prompt) > 0 and isinstance(prompt[0], Mapping)


def _check_ids(ids: Any, vocab_size: int, field: str) -> list[int]:
    array = np.asarray(ids)
    if array.ndim != 1:
        raise InvalidArgument(field, f"token ids must be 1-D, got shape {array.shape}")
    if array.size and (array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer)):
        raise InvalidArgument(field, f"token ids must be integers, got {array.dtype}")
    bad = np.flatnonzero((array < 0) | (array >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise InvalidArgument(
            f"{field}[{i}]", f"token id {int(array[i])} is outside the vocabulary [0, {vocab_size})"
        )
    return array.astype(np.int64).tolist()


def render_chat(tokenizer: Any, messages: Sequence[Any], field: str, limit: int) -> str:
    """A chat prompt as text: the chat template with the generation prompt (the turns'
    contents joined by newlines when the tokenizer has none), every message checked."""
    size = 0
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidArgument(f"{field}[{j}]", "every message must be a {role, content} map")
        for key in ("role", "content"):
            value = message.get(key)
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f"{field}[{j}].{key}", "must be a non-empty string")
            size += len(check_text(value, f"{field}[{j}].{key}", limit).encode("utf-8"))
    if size > limit:
        raise InvalidArgument(field, f"the messages are more than {limit} bytes of text together")
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not getattr(tokenizer, "chat_template", None):
        return "\n".join(m["content"] for m in chat)
    try:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    except TemplateError as err:  # e.g. roles that do not alternate as the template requires
        raise InvalidArgument(field, f"the chat template rejected these messages: {err}") from None


def _prompt_ids(tokenizer: Any, prompt: Any, field: str, limit: int) -> list[int]:
    if isinstance(prompt, str):
        text = check_text(prompt, field, limit)
        ids = list(tokenizer.encode(text, add_special_tokens=True)) if prompt else []
    elif isinstance(prompt, np.ndarray) or (isinstance(prompt, Sequence) and not _is_chat(prompt)):
        ids = _check_ids(prompt, len(tokenizer), field)
    elif isinstance(prompt, Sequence):
        text = render_chat(tokenizer, prompt, field, limit)
        templated = bool(getattr(tokenizer, "chat_template", None))
        ids = list(tokenizer.encode(text, add_special_tokens=not templated))
    else:
        kind = type(prompt).__name__
        raise InvalidArgument(field, f"must be text, a list of messages or token ids, not {kind}")
    if not ids:
        raise InvalidArgument(field, "must not be empty")
    return ids


def _completion_ids(tokenizer: Any, completion: Any, field: str, limit: int) -> list[int]:
    if completion is None:
        return []
    if isinstance(completion, str):
        return list(
            tokenizer.encode(check_text(completion, field, limit), add_special_tokens=False)
        )
    return _check_ids(completion, len(tokenizer), field)


def tokenize(
    tokenizer: Any,
    prompt: Prompt,
    completion: Completion = None,
    *,
    max_length: int,
    truncation: Truncation = "error",
    append_eos: bool = True,
    field: str = "prompt",
    completion_field: str = "completion",
) -> Tokenized:
    """Tokenize a prompt and an optional completion into one sequence.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: plain text, a chat (list of ``{"role", "content"}``), or 1-D token ids.
        completion: text or token ids appended after the prompt; ``None`` for a prompt alone.
        max_length: the most ids the result may hold.
        truncation: what to do when the ids exceed ``max_length``: ``"error"`` rejects the
            request; ``"left"`` drops ids from the start of the prompt and keeps the completion
            whole (at least one prompt id must remain); ``"right"`` cuts from the end.
        append_eos: end a completion with the end token (:func:`end_token_id`) unless it
            already ends with it. Ignored without a completion.
        field: name of the prompt in error messages, e.g. ``items[3].prompt``.
        completion_field: name of the completion in error messages.

    Returns:
        The ids, the prompt length and the completion loss mask.

    Raises:
        InvalidArgument: empty prompt, empty chat or message, unknown token ids, a chat sent to
            a model without a chat template or rejected by it, ``append_eos`` with a tokenizer
            that has no end token, a text longer than :func:`max_text_bytes`, or too many ids
            with ``truncation="error"``.
        ValueError: a bad ``max_length``/``truncation`` (server configuration errors).
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    limit = max_text_bytes(max_length)
    prompt_ids = _prompt_ids(tokenizer, prompt, field, limit)
    completion_ids = _completion_ids(tokenizer, completion, completion_field, limit)
    if completion is not None and append_eos:
        eos = end_token_id(tokenizer)
        if eos is None:
            raise InvalidArgument(
                "append_eos", "this model's tokenizer has no end token; set append_eos=false"
            )
        if not completion_ids or completion_ids[-1] != eos:
            completion_ids.append(eos)

    total = len(prompt_ids) + len(completion_ids)
    truncated = total > max_length
    if truncated and truncation == "error":
        detail = f" (prompt {len(prompt_ids)} + completion {len(completion_ids)})"
        raise InvalidArgument(
            field,
            f"{total} tokens{detail if completion_ids else ''} exceed max_length {max_length}",
        )
    if truncated and truncation == "left":
        if len(completion_ids) >= max_length:
            raise InvalidArgument(
                completion_field,
                f"{len(completion_ids)} tokens leave no room for the prompt "
                f"within max_length {max_length}",
            )
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(completion_ids)) :]
    ids = (prompt_ids + completion_ids)[:max_length]
    prompt_length = min(len(prompt_ids), max_length)

    input_ids = np.asarray(ids, dtype=np.int32)  # (T,)
    loss_mask = np.zeros(len(ids), dtype=np.uint8)  # (T,)
    loss_mask[prompt_length:] = 1
    return Tokenized(input_ids, prompt_length, loss_mask, truncated)


def tokenize_batch(
    tokenizer: Any,
    items: Sequence[tuple[Prompt, Completion]],
    *,
    max_length: int,
    truncation: Truncation = "error",
    append_eos: bool = True,
) -> list[Tokenized]:
    """Tokenize ``(prompt, completion)`` pairs (``completion`` may be ``None``).

    Errors name the item, e.g. ``items[2].prompt`` or ``items[0].completion``; see
    :func:`tokenize` for the rest.
    """
    return [
        tokenize(
            tokenizer,
            prompt,
            completion,
            max_length=max_length,
            truncation=truncation,
            append_eos=append_eos,
            field=f"items[{i}].prompt",
            completion_field=f"items[{i}].completion",
        )
        for i, (prompt, completion) in enumerate(items)
    ]
