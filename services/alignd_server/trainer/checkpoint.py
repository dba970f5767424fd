"""Checkpoints: the model as a normal transformers directory plus the training state, all in
safetensors and JSON (no pickle), written to a temporary sibling and renamed into place.

Layout of ``PATH``:
    config.json, model.safetensors, tokenizer files   the model (loadable by any service)
    value_head.safetensors                            the PPO value head, when there is one
    alignd_reward.json                                a reward model's input format
                                                      (``alignd``), for the reward service
    adapter.safetensors, adapter.json                 LoRA adapters and their spec (with LoRA,
                                                      model.safetensors holds the merged model)
    trainer_state.safetensors                         AdamW moments and step counts, RNG state
    trainer_state.json                                step, schedule position, param groups

    alignd_checkpoint.json                            the marker: what wrote it, step, kind

That is format 1, what one rank and DDP write. Under FSDP (format 2) the training state is
sharded instead: ``state/`` is a ``torch.distributed.checkpoint`` directory in which every rank
writes its own shards of the trained parameters (network names, value head and adapters
included), AdamW's moments and steps (``exp_avg.NAME``, ``exp_avg_sq.NAME``, ``step.NAME``)
and the RNG state, and ``trainer_state.json`` also lists the trained parameters' names in the
optimizer's order; no rank gathers the optimizer. The model files beside it are the same as
format 1's, gathered onto rank 0 one tensor at a time. A format 2 checkpoint loads at any
world size and in any mode (DCP reshards), a format 1 checkpoint everywhere too.

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

from alignd_server.common.errors import FailedPrecondition, InvalidArgument
from alignd_server.common.models import REWARD_CARD
from alignd_server.trainer import lora
from alignd_server.trainer.engine import SEQUENCE_CLASSIFIER, TrainerEngine

STATE_JSON, STATE_TENSORS, VALUE_HEAD, ADAPTER, ADAPTER_JSON, MARKER, SHARDED = (
    "trainer_state.json",
    "trainer_state.safetensors",
    "value_head.safetensors",
    "adapter.safetensors",
    "adapter.json",
    "alignd_checkpoint.json",
    "state",
)
FORMAT, SHARDED_FORMAT = 1, 2


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a directory an alignd trainer wrote (it carries the marker)."""
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save(engine: TrainerEngine, path: Path, include_optimizer: bool = True) -> int:
    """Writes a checkpoint of ``engine`` at ``path`` (confined by the caller) atomically;
    returns the bytes written. One process (or DDP's rank 0); FSDP runs :func:`prepare`,
    then :func:`write` on every rank, then :func:`commit`.

    Raises:
        InvalidArgument: the parent directory is missing, or ``path`` exists and is not an
            alignd checkpoint (it is never replaced).
    """
    temporary = prepare(path)
    write(engine, temporary, include_optimizer)
    return commit(temporary, Path(path))


def prepare(path: Path) -> Path:
    """Checks ``path`` may be written and makes its empty temporary sibling; returns it."""
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
    temporary.mkdir()
    return temporary


def write(engine: TrainerEngine, temporary: Path, include_optimizer: bool, writer: bool = True):
    """Writes the checkpoint's files into ``temporary``. Under FSDP every rank calls it:
    ``writer`` (rank 0) writes the gathered model files, every rank its training-state shards.
    """
    sharded = engine.sharded
    merged = sharded or engine.spec.lora is not None  # else the model saves itself as it is
    weights = engine.full_weights(keep=writer) if merged else {}
    value_head = engine.full_value_head(keep=writer)
    if writer:
        if merged:
            state = {k: v.contiguous() for k, v in weights.items()}
            if sharded:  # buffers are not sharded: the persistent ones, as they are
                for prefix, module in engine.model.named_modules():
                    for name, value in module.named_buffers(recurse=False):
                        if name not in module._non_persistent_buffers_set:
                            key = f"{prefix}.{name}" if prefix else name
                            state.setdefault(key.replace(".base_layer.", "."), value)
            engine.model.save_pretrained(temporary, state_dict=state, safe_serialization=True)
        else:
            engine.model.save_pretrained(temporary, safe_serialization=True)
        if engine.spec.lora is not None:
            spec = {"base_model": engine.spec.path, **dataclasses.asdict(engine.spec.lora)}
            (temporary / ADAPTER_JSON).write_text(json.dumps(spec))
            if not sharded:
                save_file(lora.adapter_weights(engine.model), str(temporary / ADAPTER))
        engine.loaded.tokenizer.save_pretrained(temporary)
        if engine.spec.kind == SEQUENCE_CLASSIFIER:  # the reward service reads it as trained
            (temporary / REWARD_CARD).write_text(json.dumps({"format": "alignd"}))
        if value_head is not None:
            save_file({k: v.contiguous() for k, v in value_head.items()},
                      str(temporary / VALUE_HEAD))  # fmt: skip
    if sharded:  # the trained parameters always, the optimizer when asked
        _sharded_training_state(engine, temporary, writer, include_optimizer)
    elif include_optimizer and writer:
        tensors, meta = _training_state(engine)
        save_file(tensors, str(temporary / STATE_TENSORS))
        (temporary / STATE_JSON).write_text(json.dumps(meta))
    if writer:
        marker = {"format": SHARDED_FORMAT if sharded else FORMAT, "step": engine.step,
                  "kind": engine.spec.kind}  # fmt: skip
        (temporary / MARKER).write_text(json.dumps(marker))


def commit(temporary: Path, final: Path) -> int:
    """Moves the written ``temporary`` into place at ``final``; returns its bytes."""
    final = Path(final)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    temporary.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return _directory_size(final)


def sharded_state(engine: TrainerEngine, moments: bool = True) -> dict[str, torch.Tensor]:
    """The training state as DCP's flat state dict: parameters (DTensors under FSDP) and,
    with ``moments``, AdamW's per-parameter state and the RNG state, by network name."""
    state: dict[str, torch.Tensor] = {}
    for name, parameter in engine.named_trainable():
        state[f"param.{name}"] = parameter.detach()
        if moments:
            for key, value in engine.optimizer.state.get(parameter, {}).items():
                state[f"{key}.{name}"] = value
    if moments:
        state["rng"] = torch.get_rng_state()
    return state


def _sharded_training_state(
    engine: TrainerEngine, temporary: Path, writer: bool, moments: bool
) -> None:
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(sharded_state(engine, moments), checkpoint_id=str(temporary / SHARDED))
    except (OSError, CheckpointException) as err:  # DCP's is a BaseException
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FailedPrecondition(
            f"path: cannot write the sharded training state: {detail}"
        ) from None
    if writer and moments:
        _, meta = _training_state(engine, tensors=False)
        meta["parameters"] = [name for name, _ in engine.named_trainable()]
        (temporary / STATE_JSON).write_text(json.dumps(meta))


def _training_state(
    engine: TrainerEngine, tensors: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    state = engine.optimizer.state_dict() if tensors else {"state": {}, "param_groups": []}
    if not tensors:  # the param groups without the state (it stays sharded)
        state["param_groups"] = [
            {**{k: v for k, v in group.items() if k != "params"},
             "params": list(range(len(group["params"])))}
            for group in engine.optimizer.param_groups
        ]  # fmt: skip
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
