"""Datasets for jobs: typed examples read from JSONL, JSON, Parquet or a ``datasets`` directory.

The format is told by the path: ``*.jsonl`` / ``*.ndjson`` (one JSON object per line),
``*.json`` (JSON lines, or one array of objects), ``*.parquet`` (needs ``pyarrow``), or a
directory written by ``datasets``' ``save_to_disk`` (needs ``datasets``; a ``DatasetDict``
directory is read at ``split``). Field names are configurable (:class:`Fields`); a prompt is
plain text or a chat, a list of ``{"role", "content"}`` messages. Errors name the file, the
record (``line N``, counted from 1, for JSON lines; ``row N``, the 0-based index, otherwise)
and the field.

    pairs = load_examples("prefs.parquet", "preference", fields={"chosen": "good"})
    train, held_out = split_held_out(pairs, 0.1, seed=0, by_prompt=True)
"""

from __future__ import annotations

import importlib
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Literal, TypeVar

Prompt = str | list[dict[str, str]]
Kind = Literal["sft", "preference", "prompt", "kto"]
KINDS: tuple[str, ...] = ("sft", "preference", "prompt", "kto")


@dataclass(frozen=True)
class SFTExample:
    """A prompt and the response to imitate."""

    prompt: Prompt
    response: str


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred and a dispreferred response."""

    prompt: Prompt
    chosen: str
    rejected: str


@dataclass(frozen=True)
class PromptOnly:
    """A prompt to sample from (PPO, GRPO); ``label`` is the optional reference answer a
    function scorer receives (verifiable rewards)."""

    prompt: Prompt
    label: str | None = None


@dataclass(frozen=True)
class KTOExample:
    """A prompt, one completion and whether it is desirable."""

    prompt: Prompt
    completion: str
    label: bool


Example = SFTExample | PreferencePair | PromptOnly | KTOExample
E = TypeVar("E", SFTExample, PreferencePair, PromptOnly, KTOExample)


@dataclass(frozen=True)
class Fields:
    """The record field that holds each part of an example.

    Attributes:
        prompt: the prompt (text or chat messages).
        response: the SFT response.
        chosen: the preferred response.
        rejected: the dispreferred response.
        completion: the KTO completion.
        label: the KTO label (bool or 0/1), or a prompt's reference answer.
        messages: an SFT conversation used when the record has no prompt field; its last
            message (the assistant's) is the response, the rest the prompt.
    """

    prompt: str = "prompt"
    response: str = "response"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"
    messages: str = "messages"

    @classmethod
    def of(cls, value: Fields | Mapping[str, str] | None) -> Fields:
        """``value`` as Fields; a mapping overrides the defaults it names."""
        if value is None or isinstance(value, Fields):
            return value or cls()
        known = [f.name for f in dataclass_fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown fields {unknown}; known: {', '.join(known)}")
        return cls(**value)


class DataError(ValueError):
    """A record is missing a field or holds a bad value.

    Attributes:
        path: the file or directory.
        location: ``line N`` or ``row N``.
        field: the record's field name, when one is at fault.
    """

    def __init__(self, path: Path, location: str, message: str, field: str | None = None):
        super().__init__(f"{path} {location}: {message}")
        self.path, self.location, self.field = path, location, field


def _require(module: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise ImportError(f"{purpose} needs {package}: pip install {package} ({err})") from err


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(path, f"line {number}", f"invalid JSON: {err}") from err


def _json(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as file:
        head = file.read(4096).lstrip()
    if not head.startswith("["):
        yield from _json_lines(path)
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(path, f"line {err.lineno}", f"invalid JSON: {err}") from err
    yield from ((f"row {i}", record) for i, record in enumerate(records))


def _parquet(path: Path) -> Iterator[tuple[str, Any]]:
    parquet = _require("pyarrow.parquet", f"reading {path}")
    row = 0
    for batch in parquet.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"row {row}", record
            row += 1


def _datasets_dir(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    datasets = _require("datasets", f"reading {path}")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} has splits {sorted(loaded)}, not {split!r}")
        loaded = loaded[split]
    yield from ((f"row {i}", record) for i, record in enumerate(loaded))


def iter_records(path: str | Path, split: str = "train") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields ``(location, record)`` for every record of a dataset file or directory.

    Args:
        path: a ``.jsonl`` / ``.ndjson`` / ``.json`` / ``.parquet`` file, or a directory
            saved with ``datasets``' ``save_to_disk``.
        split: the split to read from a ``DatasetDict`` directory.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: an unknown format, a missing split, or a record that is not an object
            (a :class:`DataError`).
        ImportError: ``pyarrow`` / ``datasets`` is needed and missing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    if path.is_dir():
        markers = ("dataset_dict.json", "dataset_info.json", "state.json")
        if not any((path / m).exists() for m in markers):
            raise ValueError(f"{path} is not a directory saved with datasets' save_to_disk")
        records = _datasets_dir(path, split)
    elif path.suffix in (".jsonl", ".ndjson"):
        records = _json_lines(path)
    elif path.suffix == ".json":
        records = _json(path)
    elif path.suffix == ".parquet":
        records = _parquet(path)
    else:
        raise ValueError(
            f"cannot tell the format of {path}: expected .jsonl, .ndjson, .json, .parquet "
            "or a directory saved with datasets' save_to_disk"
        )
    for location, record in records:
        if not isinstance(record, dict):
            raise DataError(path, location, f"expected an object, got {type(record).__name__}")
        yield location, record


class _Record:
    """One record being read: field access with errors that say where."""

    def __init__(self, path: Path, location: str, record: dict[str, Any]) -> None:
        self.path, self.location, self.record = path, location, record

    def error(self, field: str, message: str) -> DataError:
        return DataError(self.path, self.location, f"field {field!r} {message}", field)

    def get(self, field: str) -> Any:
        if self.record.get(field) is None:
            present = ", ".join(sorted(self.record)) or "none"
            raise DataError(
                self.path,
                self.location,
                f"missing field {field!r} (the record has: {present})",
                field,
            )
        return self.record[field]

    def prompt(self, field: str) -> Prompt:
        value = self.get(field)
        if isinstance(value, str):
            if not value.strip():
                raise self.error(field, "is empty")
            return value
        if not isinstance(value, list) or not value:
            raise self.error(field, f"must be text or chat messages, got {type(value).__name__}")
        for i, message in enumerate(value):
            if not (
                isinstance(message, Mapping)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise self.error(field, f"message {i} is not a {{role, content}} object")
        return [{"role": m["role"], "content": m["content"]} for m in value]

    def text(self, field: str) -> str:
        """A response: text, or a chat with one assistant message (TRL's conversational
        format)."""
        value = self.get(field)
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], Mapping):
            value = value[0].get("content")
        if not isinstance(value, str):
            raise self.error(field, f"must be text, got {type(value).__name__}")
        if not value:
            raise self.error(field, "is empty")
        return value

    def label(self, field: str) -> bool:
        value = self.get(field)
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise self.error(field, f"must be a boolean or 0/1, got {value!r}")


def _sft(row: _Record, f: Fields) -> SFTExample:
    if f.prompt in row.record or f.messages not in row.record:
        return SFTExample(row.prompt(f.prompt), row.text(f.response))
    messages = row.prompt(f.messages)
    if isinstance(messages, str) or len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise row.error(f.messages, "must end with an assistant message after the prompt")
    return SFTExample(messages[:-1], messages[-1]["content"])


def _prompt_only(row: _Record, f: Fields) -> PromptOnly:
    label = row.record.get(f.label)
    return PromptOnly(row.prompt(f.prompt), None if label is None else str(label))


_BUILDERS: dict[str, Callable[[_Record, Fields], Example]] = {
    "sft": _sft,
    "preference": lambda r, f: PreferencePair(
        r.prompt(f.prompt), r.text(f.chosen), r.text(f.rejected)
    ),
    "prompt": _prompt_only,
    "kto": lambda r, f: KTOExample(r.prompt(f.prompt), r.text(f.completion), r.label(f.label)),
}


def load_examples(
    path: str | Path,
    kind: Kind,
    fields: Fields | Mapping[str, str] | None = None,
    split: str = "train",
    limit: int | None = None,
) -> list[Example]:
    """Reads a dataset as typed examples.

    Args:
        path: the dataset (see :func:`iter_records`).
        kind: ``sft`` → :class:`SFTExample`, ``preference`` → :class:`PreferencePair`,
            ``prompt`` → :class:`PromptOnly`, ``kto`` → :class:`KTOExample`.
        fields: field names, overriding the defaults (:class:`Fields`).
        split: the split of a ``DatasetDict`` directory.
        limit: stop after this many examples.

    Raises:
        DataError: a record misses a field or holds a bad value (names file, record, field).
        ValueError: an unknown kind or format.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    build, names, path = _BUILDERS[kind], Fields.of(fields), Path(path)
    examples: list[Example] = []
    for location, record in iter_records(path, split):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(build(_Record(path, location, record), names))
    return examples


def prompt_key(prompt: Prompt) -> str:
    """A string that is equal for equal prompts (text or chat)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def split_held_out(
    examples: Sequence[E], held_out: float | int, seed: int = 0, by_prompt: bool = False
) -> tuple[list[E], list[E]]:
    """Splits off a held-out set, the same one for the same seed.

    Args:
        examples: the examples.
        held_out: a fraction in (0, 1) (rounded, at least 1) or a count of examples — of
            prompts with ``by_prompt``.
        seed: the shuffle's seed.
        by_prompt: keep examples that share a prompt on the same side (no prompt leaks from
            training into evaluation).

    Returns:
        ``(train, held_out)``, each in the original order.

    Raises:
        ValueError: the split would leave a side empty.
    """
    keys = [prompt_key(e.prompt) if by_prompt else str(i) for i, e in enumerate(examples)]
    units = list(dict.fromkeys(keys))  # distinct, in first-seen order
    if isinstance(held_out, float) and 0.0 < held_out < 1.0:
        count = max(1, round(held_out * len(units)))
    elif isinstance(held_out, int) and not isinstance(held_out, bool):
        count = held_out
    else:
        raise ValueError(f"held_out must be a fraction in (0, 1) or a count, got {held_out!r}")
    what = "prompts" if by_prompt else "examples"
    if not 0 < count < len(units):
        raise ValueError(f"cannot hold out {count} of {len(units)} {what}: both sides need some")
    random.Random(seed).shuffle(units)
    chosen = set(units[:count])
    train = [e for e, k in zip(examples, keys, strict=True) if k not in chosen]
    held = [e for e, k in zip(examples, keys, strict=True) if k in chosen]
    return train, held
