"""Checkpoints: the model as a normal transformers directory plus the training state, all in
safetensors and JSON (no pickle), written to a temporary sibling and renamed into place.

Layout of ``PATH``:
    config.json, model.safetensors, tokenizer files   the model (loadable by any service)
    value_head.safetensors                            the PPO value head, when there is one
    adapter.safetensors, adapter.json                 LoRA adapters and their spec (with LoRA,
                                                      model.safetensors holds the merged model)
    trainer_state.safetensors                         AdamW moments and step counts, RNG state
    trainer_state.json                                step, schedule position, param groups

    alignd_checkpoint.json                            the marker: what wrote it, step, kind

A crash before the rename leaves the previous checkpoint at ``PATH`` untouched. Saving replaces
only a directory that carries the marker, never another one. Loading reads and checks every
file first (names, shapes, dtypes, finite values, the training state's structure) and changes
the engine only when all of it fits, so a damaged checkpoint leaves the trainer as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from alignd_server.common.errors import InvalidArgument
from alignd_server.trainer import lora
from alignd_server.trainer.engine import TrainerEngine

STATE_JSON, STATE_TENSORS, VALUE_HEAD, ADAPTER, ADAPTER_JSON, MARKER = (
    "trainer_state.json",
    "trainer_state.safetensors",
    "value_head.safetensors",
    "adapter.safetensors",
    "adapter.json",
    "alignd_checkpoint.json",
)
FORMAT = 1


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a directory an alignd trainer wrote (it carries the marker)."""
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save(engine: TrainerEngine, path: Path, include_optimizer: bool = True) -> int:
    """Writes a checkpoint of ``engine`` at ``path`` (confined by the caller) atomically;
    returns the bytes written.

    Raises:
        InvalidArgument: the parent directory is missing, or ``path`` exists and is not an
            alignd checkpoint (it is never replaced).
    """
    final = Path(path)
    if not final.parent.is_dir():
        raise InvalidArgument("path", f"parent directory {final.parent} does not exist")
    if (final.exists() or final.is_symlink()) and not is_checkpoint(final):
        raise InvalidArgument(
            "path",
            f"{final} exists and is not an alignd checkpoint (it has no {MARKER}); "
            "it is not replaced: choose another path",
        )
    temporary = final.parent / f".{final.name}.partial-{os.getpid()}"
    if temporary.is_symlink():
        temporary.unlink()
    shutil.rmtree(temporary, ignore_errors=True)
    if engine.spec.lora is None:
        engine.model.save_pretrained(temporary, safe_serialization=True)
    else:
        merged = {k: v.contiguous() for k, v in lora.merged_weights(engine.model).items()}
        engine.model.save_pretrained(temporary, state_dict=merged, safe_serialization=True)
        save_file(lora.adapter_weights(engine.model), str(temporary / ADAPTER))
        spec = {"base_model": engine.spec.path, **dataclasses.asdict(engine.spec.lora)}
        (temporary / ADAPTER_JSON).write_text(json.dumps(spec))
    engine.loaded.tokenizer.save_pretrained(temporary)
    if engine.value_head is not None:
        save_file({k: v.contiguous() for k, v in engine.value_head.state_dict().items()},
                  str(temporary / VALUE_HEAD))  # fmt: skip
    if include_optimizer:
        tensors, meta = _training_state(engine)
        save_file(tensors, str(temporary / STATE_TENSORS))
        (temporary / STATE_JSON).write_text(json.dumps(meta))
    marker = {"format": FORMAT, "step": engine.step, "kind": engine.spec.kind}
    (temporary / MARKER).write_text(json.dumps(marker))
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
