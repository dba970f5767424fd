"""LoadCheckpoint: read a checkpoint whole, check it against the engine, then apply it.

:func:`read` loads every file of a checkpoint (layout in :mod:`.checkpoint`) into memory and
checks it against the engine without touching the engine: tensor names, shapes and dtypes,
finite values, the LoRA base model, and the training state's structure (optimizer moments per
parameter, parameter groups, scheduler fields, RNG state). :func:`apply` then copies what was
read; everything it does was checked, so it cannot fail half way. A damaged checkpoint (a
corrupt or truncated safetensors file, wrong shapes, malformed JSON) is INVALID_ARGUMENT naming
``path`` (or ``load_optimizer``) and leaves the weights, optimizer and step as they were.

A sharded (format 2) checkpoint is read with ``torch.distributed.checkpoint`` into fresh
tensors shaped like this engine's (DTensor shards under FSDP, whole tensors otherwise: DCP
reshards to any world size). DCP keeps its index in a pickle; it is read with an unpickler
that admits only DCP's metadata classes, torch sizes and dtypes, and paths, so a planted file
cannot run code. Under FSDP a whole (format 1) checkpoint is read whole by every rank and each
keeps its shard of every tensor.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from alignd_server.common.errors import InvalidArgument
from alignd_server.trainer.checkpoint import (
    ADAPTER,
    ADAPTER_JSON,
    MARKER,
    SHARDED,
    SHARDED_FORMAT,
    STATE_JSON,
    STATE_TENSORS,
    VALUE_HEAD,
    sharded_state,
)
from alignd_server.trainer.engine import TrainerEngine

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class Restored:
    """A checkpoint read and checked, ready to apply."""

    parameters: dict[str, torch.Tensor]  # trainable or loadable tensors, by parameter name
    value_head: dict[str, torch.Tensor] | None
    optimizer: dict | None  # an optimizer state_dict
    scheduler: dict | None
    rng: torch.Tensor | None
    step: int | None
    sharded: dict[str, torch.Tensor] | None = None  # format 2: the trained parameters, by
    # network name, shaped like the engine's


def _damaged(what: str, detail: Any, field: str = "path") -> InvalidArgument:
    return InvalidArgument(field, f"the checkpoint's {what} is damaged: {detail}")


def _tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise _damaged(file.name, err) from None


def _json(file: Path, field: str = "path") -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _damaged(file.name, err, field) from None


def _fit(name: str, tensor: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if tuple(tensor.shape) != tuple(expected.shape):
        raise InvalidArgument(
            "path", f"checkpoint does not fit the model: {what} {name!r} has shape "
            f"{list(tensor.shape)}, the model's is {list(expected.shape)}",
        )  # fmt: skip
    if not expected.dtype.is_floating_point:
        if tensor.dtype != expected.dtype:
            raise _damaged(what, f"{name!r} is {tensor.dtype}, the model's is {expected.dtype}")
    elif not tensor.dtype.is_floating_point or not bool(torch.isfinite(tensor).all()):
        raise _damaged(what, f"{name!r} is not finite floating point")


def read(engine: TrainerEngine, path: str, load_optimizer: bool = True) -> Restored:
    """Reads and checks the checkpoint at ``path`` (confined by the caller) for ``engine``.

    Raises:
        InvalidArgument: not a checkpoint, damaged, or made for another model or kind.
    """
    directory = Path(path)
    if not path or not (directory / "config.json").is_file():
        raise InvalidArgument("path", f"{path!r} is not a checkpoint directory")
    marker = _json(directory / MARKER) if (directory / MARKER).is_file() else {}
    if isinstance(marker, dict) and marker.get("format") == SHARDED_FORMAT:
        return _read_sharded(engine, directory, load_optimizer)
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("model*.safetensors")):
        weights.update(_tensors(file))
    if engine.spec.lora is None:
        parameters = _full_weights(engine, weights)
    else:
        parameters = _adapters(engine, directory, weights)
    value_head = None
    if engine.value_head is not None and (directory / VALUE_HEAD).is_file():
        value_head = _tensors(directory / VALUE_HEAD)
        expected = engine.value_head.state_dict()
        if set(value_head) != set(expected):
            raise _damaged(VALUE_HEAD, f"tensors {sorted(value_head)}, expected {sorted(expected)}")
        for name, tensor in value_head.items():
            _fit(name, tensor, expected[name], VALUE_HEAD)
    restored = Restored(parameters, value_head, None, None, None, None)
    if load_optimizer:
        _training_state(engine, directory, restored)
    return restored


class _SafeMetadata(pickle.Unpickler):
    """Unpickles DCP's index, admitting only the classes it is made of."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str):
        allowed = (
            (module in self.MODULES and not name.startswith("__"))
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                    torch.dtype)))
            or (module, name) in {("torch.serialization", "_get_layout"),
                                  ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}
        )  # fmt: skip
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP index")
        return super().find_class(module, name)


class _Reader(FileSystemReader):
    """DCP's file reader with a safe index: its pickle through :class:`_SafeMetadata`, and
    every data file it names a plain file name inside the ``state/`` directory (a planted
    index cannot make the trainer read outside it)."""

    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / ".metadata", "rb") as file:
            metadata = _SafeMetadata(file).load()
        for info in (getattr(metadata, "storage_data", None) or {}).values():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise pickle.UnpicklingError(f"data file {name!r} is not inside the checkpoint")
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


def _read_sharded(engine: TrainerEngine, directory: Path, load_optimizer: bool) -> Restored:
    """Format 2: the trained parameters (and moments) from ``state/`` via DCP."""
    from torch.distributed import checkpoint as dcp

    state = directory / SHARDED
    reader = _Reader(str(state))
    try:
        metadata = reader.read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as err:
        raise _damaged(f"{SHARDED}/.metadata", err) from None
    saved = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(saved, dict):
        raise _damaged(f"{SHARDED}/.metadata", "no state_dict_metadata")
    if load_optimizer:
        meta = _json(directory / STATE_JSON, "load_optimizer") if (
            directory / STATE_JSON).is_file() else None  # fmt: skip
        if meta is None or not any(k.startswith("exp_avg.") for k in saved):
            raise InvalidArgument("load_optimizer", f"{str(directory)!r} holds no training state")
    template = {}
    for key, value in sharded_state(engine, moments=False).items():
        template[key] = torch.empty_like(value)
    names = [name for name, _ in engine.named_trainable()]
    if load_optimizer:
        for name, parameter in engine.named_trainable():
            template[f"exp_avg.{name}"] = torch.empty_like(parameter.detach())
            template[f"exp_avg_sq.{name}"] = torch.empty_like(parameter.detach())
            template[f"step.{name}"] = torch.zeros((), dtype=torch.float32)
        template["rng"] = torch.empty_like(torch.get_rng_state())
    wanted = {k for k in saved if k.startswith("param.")} if not load_optimizer else set(saved)
    missing, unexpected = sorted(set(template) - set(saved)), sorted(wanted - set(template))
    if missing or unexpected:
        raise InvalidArgument(
            "path", f"checkpoint does not fit the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]} (LoRA and full fine-tuning differ)",
        )  # fmt: skip
    for key, value in template.items():
        size = getattr(saved[key], "size", None)
        if size is None or tuple(size) != tuple(value.shape):
            raise InvalidArgument(
                "path", f"checkpoint does not fit the model: {key!r} has shape "
                f"{list(size) if size is not None else None}, the model's is {list(value.shape)}",
            )  # fmt: skip
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(template, storage_reader=reader)
    except (Exception, CheckpointException) as err:  # DCP's is a BaseException
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _damaged(SHARDED, detail) from None
    for key, value in template.items():
        local = value.to_local() if hasattr(value, "to_local") else value
        if key != "rng" and local.dtype.is_floating_point and not bool(torch.isfinite(local).all()):
            raise _damaged(SHARDED, f"{key!r} is not finite")
    restored = Restored({}, None, None, None, None, None,
                        sharded={n: template[f"param.{n}"] for n in names})  # fmt: skip
    if load_optimizer:
        _check_state_meta(engine, meta)
        if meta.get("parameters") != names:
            raise _damaged(STATE_JSON, "its parameter names do not match", "load_optimizer")
        restored.optimizer = {
            "state": {i: {k: template[f"{k}.{n}"] for k in ("step", *MOMENTS)}
                      for i, n in enumerate(names)},
            "param_groups": meta["param_groups"],
        }  # fmt: skip
        restored.scheduler = meta["scheduler"]
        restored.rng = _rng({"rng.torch": template["rng"]})
        restored.step = meta["step"]
    return restored


def _full_weights(engine: TrainerEngine, weights: dict) -> dict[str, torch.Tensor]:
    state = engine.model.state_dict(keep_vars=True)  # tied weights: one tensor, several names
    saved = {id(state[n]) for n in weights if n in state}  # the file holds each tensor once
    missing = [n for n in state if n not in weights and id(state[n]) not in saved]
    unexpected = [n for n in weights if n not in state]
    if missing or unexpected:
        raise InvalidArgument(
            "path",
            f"checkpoint does not fit the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}",
        )
    for name, tensor in weights.items():
        _fit(name, tensor, state[name], "weights")
    return weights


def _adapters(engine: TrainerEngine, directory: Path, weights: dict) -> dict[str, torch.Tensor]:
    """Adapters and fully trained heads of a LoRA engine (its frozen base stays as loaded)."""
    if not (directory / ADAPTER).is_file():
        raise InvalidArgument("path", f"{directory} holds no LoRA adapters ({ADAPTER})")
    spec = _json(directory / ADAPTER_JSON)
    base = spec.get("base_model") if isinstance(spec, dict) else None
    if not isinstance(base, str):
        raise _damaged(ADAPTER_JSON, "no base_model")
    if Path(base).resolve() != Path(engine.spec.path).resolve():
        raise InvalidArgument(
            "path", f"the adapters were trained on {base}, this trainer holds {engine.spec.path}"
        )
    state = _tensors(directory / ADAPTER)
    parameters = {}
    for name, parameter in engine.model.named_parameters():
        if not parameter.requires_grad:
            continue
        source = state if "lora_" in name else weights
        if name not in source:
            raise InvalidArgument("path", f"checkpoint does not fit the model: {name}")
        _fit(name, source[name], parameter, ADAPTER if "lora_" in name else "weights")
        parameters[name] = source[name]
    return parameters


def _training_state(engine: TrainerEngine, directory: Path, restored: Restored) -> None:
    if not (directory / STATE_JSON).is_file():
        raise InvalidArgument("load_optimizer", f"{str(directory)!r} holds no training state")
    meta = _json(directory / STATE_JSON, "load_optimizer")
    _check_state_meta(engine, meta)
    tensors = _tensors(directory / STATE_TENSORS)
    restored.optimizer = {"state": _moments(engine, tensors), "param_groups": meta["param_groups"]}
    restored.scheduler = meta["scheduler"]
    restored.rng = _rng(tensors)
    restored.step = meta["step"]


def _check_state_meta(engine: TrainerEngine, meta: Any) -> None:
    """trainer_state.json: step, param groups and scheduler fit this engine."""
    if not isinstance(meta, dict) or not {"step", "param_groups", "scheduler"} <= set(meta):
        raise _damaged(STATE_JSON, "it needs step, param_groups and scheduler", "load_optimizer")
    groups = meta["param_groups"]
    trained = len(engine.optimizer.param_groups[0]["params"])
    saved = len(groups[0].get("params", [])) if _is_groups(groups) else -1
    if meta.get("kind") != engine.spec.kind or saved != trained:
        raise InvalidArgument(
            "load_optimizer",
            f"the checkpoint's training state is for a {meta.get('kind')} training {saved} "
            f"tensors, this trainer trains {trained} of a {engine.spec.kind} (LoRA and full "
            "fine-tuning differ); load the weights alone with load_optimizer=false",
        )
    _check_groups(engine, groups)
    _check_scheduler(engine, meta["scheduler"])
    step = meta["step"]
    if not isinstance(step, int) or step < 0:
        raise _damaged(STATE_JSON, f"step {step!r}", "load_optimizer")


def _is_groups(groups: Any) -> bool:
    return (
        isinstance(groups, list)
        and len(groups) == 1
        and isinstance(groups[0], dict)
        and isinstance(groups[0].get("params"), list)
    )


def _check_groups(engine: TrainerEngine, groups: list) -> None:
    current = engine.optimizer.param_groups[0]
    group = groups[0]
    if set(group) != set(current) or group["params"] != list(range(len(current["params"]))):
        raise _damaged(STATE_JSON, "param_groups do not match this optimizer", "load_optimizer")
    numbers = [group[k] for k in ("lr", "eps", "weight_decay", "initial_lr") if k in group]
    betas = group.get("betas")
    if (
        not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in numbers)
        or not isinstance(betas, list)
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
    ):
        raise _damaged(STATE_JSON, "param_groups hold values out of range", "load_optimizer")


def _check_scheduler(engine: TrainerEngine, scheduler: Any) -> None:
    current = engine.scheduler.state_dict()
    if not isinstance(scheduler, dict) or set(scheduler) != set(current):
        raise _damaged(STATE_JSON, "the scheduler state does not match", "load_optimizer")
    if not isinstance(scheduler.get("last_epoch"), int) or not isinstance(
        scheduler.get("base_lrs"), list
    ):
        raise _damaged(STATE_JSON, "the scheduler state is malformed", "load_optimizer")


def _moments(engine: TrainerEngine, tensors: dict[str, torch.Tensor]) -> dict:
    parameters = engine.parameters
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("optimizer."):
            continue
        _, index, name = key.split(".", 2)
        if not index.isdigit() or int(index) >= len(parameters) or name not in (*MOMENTS, "step"):
            raise _damaged(STATE_TENSORS, f"unexpected tensor {key!r}", "load_optimizer")
        expected = parameters[int(index)] if name != "step" else torch.zeros(())
        _fit(key, value, expected, STATE_TENSORS)
        state.setdefault(int(index), {})[name] = value
    for index, values in state.items():
        if set(values) != {*MOMENTS, "step"}:
            raise _damaged(STATE_TENSORS, f"parameter {index} lacks moments", "load_optimizer")
    return state


def _rng(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    rng = tensors.get("rng.torch")
    current = torch.get_rng_state()
    if rng is None or rng.dtype != current.dtype or rng.shape != current.shape:
        raise _damaged(STATE_TENSORS, "no valid rng.torch", "load_optimizer")
    return rng


def apply(engine: TrainerEngine, restored: Restored) -> int:
    """Copies a checked checkpoint into ``engine``; returns the step."""
    with torch.no_grad():
        if restored.sharded is not None:
            for name, parameter in engine.named_trainable():
                parameter.copy_(restored.sharded[name])
        elif engine.spec.lora is None and not engine.sharded:
            engine.model.load_state_dict(restored.parameters, strict=False)
        else:
            named = engine.model.state_dict(keep_vars=True)
            for name, tensor in restored.parameters.items():
                _assign(named[name], tensor)
        if restored.value_head is not None:
            named = dict(engine.value_head.named_parameters())
            for name, tensor in restored.value_head.items():
                _assign(named[name], tensor)
    if restored.optimizer is None:
        return engine.step
    optimizer = restored.optimizer
    if engine.sharded and restored.sharded is None:  # whole moments: each rank keeps its shard
        parameters = engine.parameters
        optimizer = {**optimizer, "state": {
            i: {k: _shard_like(parameters[i], v) if k != "step" else v for k, v in m.items()}
            for i, m in optimizer["state"].items()}}  # fmt: skip
    engine.optimizer.load_state_dict(optimizer)
    engine.scheduler.load_state_dict(restored.scheduler)
    torch.set_rng_state(restored.rng)
    engine.step = restored.step
    engine.drop_gradients()
    return engine.step


def _shard_like(target: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole) as ``target`` holds it: this rank's shard when ``target`` is a
    DTensor (every rank has the whole tensor, so nothing is sent)."""
    if not hasattr(target, "device_mesh"):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        tensor.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None
    )


def _assign(target: torch.Tensor, tensor: torch.Tensor) -> None:
    target.copy_(_shard_like(target, tensor))


def load(engine: TrainerEngine, path: str, load_optimizer: bool = True) -> int:
    """Restores weights (and training state) from a checkpoint into ``engine``; returns the
    step. Nothing changes unless the whole checkpoint fits."""
    return apply(engine, read(engine, path, load_optimizer))
