"""Loading models from local directories: the one place every service loads a model.

Only local Hugging Face directories with safetensors weights are accepted. Loading never
touches the network (``local_files_only=True``), never runs code shipped with a checkpoint
(``trust_remote_code=False``) and never unpickles weights (``use_safetensors=True``); this is
set per call, not through ``HF_HUB_OFFLINE``. Bundled model names are resolved to directories
by :func:`alignd.models.resolve_model` before they reach this module.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.utils import logging as hf_logging

from alignd_server.common.tokenization import end_token_id

logger = logging.getLogger(__name__)
# Servers log one line per event; transformers' progress bars would garble the log.
hf_logging.disable_progress_bar()

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
INIT_SEED = 0
"""Seed for weights a checkpoint lacks (a fresh reward head), so they are reproducible."""
REWARD_CARD = "alignd_reward.json"
"""The file beside a reward model that says how to read and normalise its scores
(:class:`alignd_server.reward.scorers.RewardCard`)."""

_LOCAL = {"local_files_only": True, "trust_remote_code": False}


@dataclass
class LoadedModel:
    """A model ready to serve, with what ``GetInfo`` reports about it.

    Attributes:
        model: the torch module, in eval mode, on ``device``.
        tokenizer: its tokenizer; always has a pad token.
        path: the directory it was loaded from.
        name: the directory's name, e.g. ``smollm2-135m``.
        architecture: the model class, e.g. ``LlamaForCausalLM``.
        num_parameters: parameter count.
        dtype: parameter dtype name, e.g. ``float32``.
        device: torch device string, e.g. ``cpu``.
        vocab_size: number of ids the tokenizer can produce.
        has_chat_template: whether the tokenizer can render chats.
        eos_token_id: the id that ends a sequence (eos, else sep), or ``None``.
        max_positions: the longest sequence the model's position embeddings cover
            (``max_position_embeddings``), or ``None`` when its config states none.
    """

    model: Any
    tokenizer: Any
    path: Path
    name: str
    architecture: str
    num_parameters: int
    dtype: str
    device: str
    vocab_size: int
    has_chat_template: bool
    eos_token_id: int | None
    max_positions: int | None = None

    def sequence_limit(self, configured: int) -> int:
        """``configured`` (a server's max_sequence_length), lowered to :attr:`max_positions`
        when the model covers fewer positions: a longer item would fail inside the model."""
        if self.max_positions is None or configured <= self.max_positions:
            return configured
        logger.warning(
            "max_sequence_length %d exceeds the position limit of %s (max_position_embeddings "
            "%d); serving at most %d tokens per sequence",
            configured, self.name, self.max_positions, self.max_positions,
        )  # fmt: skip
        return self.max_positions


def use_deterministic_algorithms() -> None:
    """Makes this process's torch kernels deterministic (the ``deterministic`` setting): the
    same inputs give bit-identical outputs. cuBLAS needs its workspace fixed before CUDA
    starts, hence the environment variable (kept if the user set it)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    logger.info("deterministic torch algorithms on")


def resolve_dtype(name: str) -> torch.dtype:
    """Map ``float32``/``bfloat16``/``float16`` to the torch dtype.

    Raises:
        ValueError: any other name.
    """
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


def _check_dir(path: Path | str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"model directory {path} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory: it has no config.json")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth"})
        hint = f" (found {', '.join(found)}; pickled weights are not loaded)" if found else ""
        raise ValueError(f"{path} has no *.safetensors weights{hint}")
    return path


def _check_device(device: str) -> str:
    try:
        return str(torch.device(device))
    except RuntimeError as err:
        raise ValueError(f"invalid device {device!r}: {err}") from None


def load_tokenizer(path: Path | str) -> Any:
    """Load the tokenizer of a local model directory, making sure it has a pad token.

    A tokenizer without one pads with its eos token, else its sep token.

    Raises:
        ValueError: the directory is missing, or the tokenizer has no pad, eos or sep token.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"model directory {path} does not exist or is not a directory")
    tokenizer = AutoTokenizer.from_pretrained(path, **_LOCAL)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or getattr(tokenizer, "sep_token", None)
        if fallback is None:
            raise ValueError(f"the tokenizer in {path} has no pad, eos or sep token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def _finish(model: Any, tokenizer: Any, path: Path, device: str) -> LoadedModel:
    """Move to ``device`` (a model on the meta device stays there), switch to eval mode and
    describe the result."""
    if model.device.type != "meta":
        model.to(device)
    model.eval()
    if model.config.pad_token_id is None:
        # Sequence classifiers find each row's last token through the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=path,
        name=path.name,
        architecture=type(model).__name__,
        num_parameters=model.num_parameters(),
        dtype=str(model.dtype).removeprefix("torch."),
        device=device,
        vocab_size=len(tokenizer),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        eos_token_id=end_token_id(tokenizer),
        max_positions=_positions(model.config),
    )


def _positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_causal_lm(
    path: Path | str, *, dtype: str = "float32", device: str = "cpu", meta: bool = False
) -> LoadedModel:
    """Load a causal LM (policy or reference) and its tokenizer from a local directory.

    Args:
        path: a Hugging Face model directory with safetensors weights.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: torch device, e.g. ``cpu`` or ``cuda:0``.
        meta: build the model from its config on the meta device, reading no weights (the
            FSDP ranks that receive their shards from rank 0).

    Raises:
        ValueError: missing directory, no config or safetensors, bad dtype or device.
    """
    path = _check_dir(path)
    torch_dtype, device = resolve_dtype(dtype), _check_device(device)
    tokenizer = load_tokenizer(path)
    if meta:
        config = AutoConfig.from_pretrained(path, **_LOCAL)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=True, **_LOCAL
        )
    return _finish(model, tokenizer, path, device)


def _classifier_head(path: Path) -> bool:
    """Whether the checkpoint already has a sequence-classification head.

    Raises:
        ValueError: it has one with more than one output (a reward model needs a scalar).
    """
    config = AutoConfig.from_pretrained(path, **_LOCAL)
    architectures = config.architectures or []
    trained = any(a.endswith("ForSequenceClassification") for a in architectures)
    if trained and config.num_labels != 1:
        raise ValueError(
            f"{path} is a sequence classifier with {config.num_labels} labels; "
            "a reward model needs exactly one (a scalar score)"
        )
    return trained


def load_sequence_classifier(
    path: Path | str, *, dtype: str = "float32", device: str = "cpu", meta: bool = False
) -> LoadedModel:
    """Load a scalar sequence classifier (reward model) and its tokenizer.

    A checkpoint saved as ``*ForSequenceClassification`` must have exactly one label. A bare
    backbone (e.g. ``BertModel`` such as all-MiniLM-L6-v2) gets a fresh one-output head,
    initialised with :data:`INIT_SEED` so that two loads score alike.

    Args:
        path: a Hugging Face model directory with safetensors weights.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: torch device, e.g. ``cpu`` or ``cuda:0``.
        meta: build the model from its config on the meta device, reading no weights.

    Raises:
        ValueError: missing directory, no config or safetensors, a classifier with more than
            one label, bad dtype or device.
    """
    path = _check_dir(path)
    torch_dtype, device = resolve_dtype(dtype), _check_device(device)
    has_head = _classifier_head(path)
    tokenizer = load_tokenizer(path)
    if meta:
        config = AutoConfig.from_pretrained(path, num_labels=1, **_LOCAL)
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config, dtype=torch_dtype)
        return _finish(model, tokenizer, path, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch_dtype, use_safetensors=True, **_LOCAL
        )
    if not has_head:
        logger.warning("%s has no classification head; added a fresh scalar head", path)
    return _finish(model, tokenizer, path, device)
