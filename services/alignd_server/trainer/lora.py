"""Low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Each adapted linear layer computes ``W x + (α / r) · B A x`` with ``A`` (r, in) and ``B``
(out, r) trainable and ``W`` frozen. The adapters are injected into the transformers model in
place by ``peft`` (the only module that imports it), so the trainer keeps calling the model as
it would without them. What leaves the trainer — checkpoints' ``model.safetensors`` and pushed
weights — is the *merged* model ``W + (α / r) · B A`` under the original parameter names, which
every service loads like any other model; the adapters themselves are saved beside it
(``adapter.safetensors``) so training resumes exactly.

A reward model's fresh scoring head (``score`` or ``classifier``) and a PPO value head train
fully alongside the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignd_server.common.errors import InvalidArgument

HEADS = ("score", "classifier")
"""Names of sequence-classifier heads that train fully under LoRA."""


@dataclass
class LoraSpec:
    """What ``Initialize.lora`` asks for."""

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - peft comes with the serve extra
        raise InvalidArgument(
            "lora", "LoRA needs the peft package: pip install 'alignd[serve]'"
        ) from err
    return peft


def apply(model: torch.nn.Module, spec: LoraSpec, seed: int) -> None:
    """Injects adapters into ``model`` in place and freezes everything else but the heads.

    Raises:
        InvalidArgument: ``lora.target_modules`` names no module of the model.
    """
    peft = _peft()
    heads = [h for h in HEADS if isinstance(getattr(model, h, None), torch.nn.Module)]
    config = peft.LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=spec.target_modules or "all-linear", exclude_modules=heads or None,
        bias="none",
    )  # fmt: skip
    torch.manual_seed(seed)
    try:
        peft.inject_adapter_in_model(config, model)
    except ValueError as err:
        raise InvalidArgument("lora.target_modules", str(err).splitlines()[0]) from None
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "lora_" in name or name.split(".")[0] in HEADS


def is_adapted(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries adapters."""
    return any("lora_" in name for name, _ in model.named_parameters())


def set_dropout(model: torch.nn.Module, active: bool) -> None:
    """Switches the adapters' input dropout on (ForwardBackward) or off (everything else).

    The rest of the model stays in eval mode either way.
    """
    for name, module in model.named_modules():
        if name.endswith("lora_dropout"):
            module.train(active)


def merged_weights(model: torch.nn.Module, full=None, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's parameters by their original names, adapters merged in (tied ones once).

    For a model without adapters these are simply its parameters. ``full`` turns a parameter
    into its whole tensor (FSDP: the all-gather of its shards, a collective every rank runs
    in the same order); with ``keep`` false the gathered tensors are dropped one by one and
    nothing is returned (the ranks that only take part).
    """
    if full is None:
        merged: dict[str, torch.Tensor] = {}
        for name, parameter in model.named_parameters():
            if "lora_" not in name:
                merged[name.replace(".base_layer.", ".")] = parameter.detach()
        for name, module in model.named_modules():
            delta = getattr(module, "get_delta_weight", None)
            if delta is not None and "default" in getattr(module, "lora_A", {}):
                with torch.no_grad():
                    merged[f"{name}.weight"] = module.base_layer.weight + delta("default")
        return merged
    tensors = {}
    for name, parameter in model.named_parameters():
        tensor = full(parameter.detach())
        if keep:
            tensors[name] = tensor
    if not keep:
        return {}
    merged = {n.replace(".base_layer.", "."): t for n, t in tensors.items() if "lora_" not in n}
    for name, module in model.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            # peft's Linear delta, from the gathered tensors: (B A)^T if fan_in_fan_out, × scale
            a, b = (tensors[f"{name}.lora_{x}.default.weight"] for x in "AB")
            delta = b @ a
            if getattr(module, "fan_in_fan_out", False):
                delta = delta.T
            base = tensors[f"{name}.base_layer.weight"]
            merged[f"{name}.weight"] = base + delta * module.scaling["default"]
    return merged


def check_shardable(model: torch.nn.Module) -> None:
    """FSDP merges adapters from gathered tensors with the linear layers' formula (also
    transformers' transposed ``Conv1D``): adapters on embeddings or convolutions are refused.

    Raises:
        InvalidArgument: an adapted module is not a linear layer.
    """
    other = (torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    for name, module in model.named_modules():
        adapted = "default" in getattr(module, "lora_A", {})
        if "default" in getattr(module, "lora_embedding_A", {}) or (
            adapted and isinstance(module.base_layer, other)
        ):
            raise InvalidArgument(
                "lora.target_modules",
                f"{name} is not a linear layer; with --parallel fsdp adapters go on linear "
                "layers only",
            )


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter matrices by their injected names (what a checkpoint needs to resume)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n}
