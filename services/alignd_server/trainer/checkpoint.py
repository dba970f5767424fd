"""Checkpoints: the model as a normal transformers directory plus the training state, all in
safetensors and JSON (no pickle), written to a temporary sibling and renamed into place.

Layout of ``PATH``:
    config.json, model.safetensors, tokenizer files   the model (loadable by any service)
    value_head.safetensors                            the PPO value head, when there is one
    trainer_state.safetensors                         AdamW moments and step counts, RNG state
    trainer_state.json                                step, schedule position, param groups

A crash before the rename leaves the previous checkpoint at ``PATH`` untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignd_server.common.errors import InvalidArgument
from alignd_server.trainer.engine import TrainerEngine

STATE_JSON, STATE_TENSORS, VALUE_HEAD = (
    "trainer_state.json",
    "trainer_state.safetensors",
    "value_head.safetensors",
)


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save(engine: TrainerEngine, path: str, include_optimizer: bool = True) -> int:
    """Writes a checkpoint of ``engine`` at ``path`` atomically; returns the bytes written."""
    if not path:
        raise InvalidArgument("path", "must be set")
    final = Path(path)
    if not final.parent.is_dir():
        raise InvalidArgument("path", f"parent directory {final.parent} does not exist")
    temporary = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    engine.model.save_pretrained(temporary, safe_serialization=True)
    engine.loaded.tokenizer.save_pretrained(temporary)
    if engine.value_head is not None:
        save_file({k: v.contiguous() for k, v in engine.value_head.state_dict().items()},
                  str(temporary / VALUE_HEAD))  # fmt: skip
    if include_optimizer:
        tensors, meta = _training_state(engine)
        save_file(tensors, str(temporary / STATE_TENSORS))
        (temporary / STATE_JSON).write_text(json.dumps(meta))
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    temporary.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return _directory_size(final)


def _training_state(engine: TrainerEngine) -> tuple[dict[str, torch.Tensor], dict]:
    state = engine.optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).contiguous()
    meta = {
        "step": engine.step,
        "param_groups": state["param_groups"],
        "scheduler": engine.scheduler.state_dict(),
        "kind": engine.spec.kind,
    }
    return tensors, meta


def load(engine: TrainerEngine, path: str, load_optimizer: bool = True) -> int:
    """Restores weights (and training state) from a checkpoint into ``engine``; returns the step."""
    directory = Path(path)
    if not path or not (directory / "config.json").is_file():
        raise InvalidArgument("path", f"{path!r} is not a checkpoint directory")
    weights = {}
    for file in sorted(directory.glob("model*.safetensors")):
        weights.update(load_file(str(file)))
    missing, unexpected = engine.model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not _tied(engine, m)]
    if missing or unexpected:
        raise InvalidArgument("path", f"checkpoint does not fit the model: missing {missing[:3]}, "
                                      f"unexpected {unexpected[:3]}")  # fmt: skip
    if engine.value_head is not None and (directory / VALUE_HEAD).is_file():
        engine.value_head.load_state_dict(load_file(str(directory / VALUE_HEAD)))
    if not load_optimizer:
        return engine.step
    if not (directory / STATE_JSON).is_file():
        raise InvalidArgument("load_optimizer", f"{path!r} holds no training state")
    meta = json.loads((directory / STATE_JSON).read_text())
    tensors = load_file(str(directory / STATE_TENSORS))
    optimizer_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    engine.optimizer.load_state_dict(
        {"state": optimizer_state, "param_groups": meta["param_groups"]}
    )
    engine.scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    engine.step = int(meta["step"])
    engine.accumulated = 0
    engine.optimizer.zero_grad(set_to_none=True)
    return engine.step


def _tied(engine: TrainerEngine, name: str) -> bool:
    """Whether a parameter absent from the file is tied to one present (lm_head to embeddings)."""
    return name == "lm_head.weight" and getattr(engine.model.config, "tie_word_embeddings", False)
