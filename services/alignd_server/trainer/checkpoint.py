"""Checkpoints: the model as a normal transformers directory plus the training state, all in
safetensors and JSON (no pickle), written to a temporary sibling and renamed into place.

Layout of ``PATH``:
    config.json, model.safetensors, tokenizer files   the model (loadable by any service)
    value_head.safetensors                            the PPO value head, when there is one
    adapter.safetensors, adapter.json                 LoRA adapters and their spec (with LoRA,
                                                      model.safetensors holds the merged model)
    trainer_state.safetensors                         AdamW moments and step counts, RNG state
    trainer_state.json                                step, schedule position, param groups

A crash before the rename leaves the previous checkpoint at ``PATH`` untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignd_server.common.errors import InvalidArgument
from alignd_server.trainer import lora
from alignd_server.trainer.engine import TrainerEngine

STATE_JSON, STATE_TENSORS, VALUE_HEAD, ADAPTER, ADAPTER_JSON = (
    "trainer_state.json",
    "trainer_state.safetensors",
    "value_head.safetensors",
    "adapter.safetensors",
    "adapter.json",
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
    if engine.spec.lora is None:
        missing, unexpected = engine.model.load_state_dict(weights, strict=False)
        missing = [m for m in missing if not _tied(engine, m)]
        if missing or unexpected:
            raise InvalidArgument(
                "path",
                f"checkpoint does not fit the model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}",
            )
    else:
        _load_adapters(engine, directory, weights)
    if engine.value_head is not None and (directory / VALUE_HEAD).is_file():
        engine.value_head.load_state_dict(load_file(str(directory / VALUE_HEAD)))
    if not load_optimizer:
        return engine.step
    if not (directory / STATE_JSON).is_file():
        raise InvalidArgument("load_optimizer", f"{path!r} holds no training state")
    meta = json.loads((directory / STATE_JSON).read_text())
    saved = len(meta["param_groups"][0]["params"])
    trained = len(engine.optimizer.param_groups[0]["params"])
    if meta.get("kind") != engine.spec.kind or saved != trained:
        raise InvalidArgument(
            "load_optimizer",
            f"the checkpoint's training state is for a {meta.get('kind')} training {saved} "
            f"tensors, this trainer trains {trained} of a {engine.spec.kind} (LoRA and full "
            "fine-tuning differ); load the weights alone with load_optimizer=false",
        )
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


def _load_adapters(engine: TrainerEngine, directory: Path, weights: dict) -> None:
    """Adapters and fully trained heads into a LoRA engine (its frozen base stays as loaded)."""
    if not (directory / ADAPTER).is_file():
        raise InvalidArgument("path", f"{directory} holds no LoRA adapters ({ADAPTER})")
    spec = json.loads((directory / ADAPTER_JSON).read_text())
    if Path(spec["base_model"]).resolve() != Path(engine.spec.path).resolve():
        raise InvalidArgument(
            "path", f"the adapters were trained on {spec['base_model']}, "
                    f"this trainer holds {engine.spec.path}"
        )  # fmt: skip
    state = load_file(str(directory / ADAPTER))
    for name, parameter in engine.model.named_parameters():
        if not parameter.requires_grad:
            continue
        source = state if "lora_" in name else weights
        if name not in source or source[name].shape != parameter.shape:
            raise InvalidArgument("path", f"checkpoint does not fit the model: {name}")
        with torch.no_grad():
            parameter.copy_(source[name])


def _tied(engine: TrainerEngine, name: str) -> bool:
    """Whether a parameter absent from the file is tied to one present (lm_head to embeddings)."""
    return name == "lm_head.weight" and getattr(engine.model.config, "tie_word_embeddings", False)
