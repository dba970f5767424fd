"""Builders of the ModelInfo, Limits and ServerInfo messages every GetInfo returns."""

from __future__ import annotations

import time

from alignd import __version__
from alignd.v1 import common_pb2 as pb
from alignd_server.common.config import ModelServerSettings, ServerSettings
from alignd_server.common.models import LoadedModel
from alignd_server.common.tokenization import max_text_bytes


def model_info(loaded: LoadedModel) -> pb.ModelInfo:
    """ModelInfo of a loaded model."""
    return pb.ModelInfo(
        name=loaded.name,
        path=str(loaded.path),
        architecture=loaded.architecture,
        num_parameters=loaded.num_parameters,
        dtype=loaded.dtype,
        device=loaded.device,
        vocab_size=loaded.vocab_size,
        has_chat_template=loaded.has_chat_template,
        eos_token_ids=eos_token_ids(loaded),
    )


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """The tokenizer's end token, then any other end ids the model's generation config lists."""
    ids = [] if loaded.eos_token_id is None else [loaded.eos_token_id]
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    for token in [configured] if isinstance(configured, int) else list(configured or []):
        if token not in ids:
            ids.append(token)
    return ids


def limits(settings: ServerSettings, **extra: int) -> pb.Limits:
    """The limits a server enforces, from its settings (``extra`` adds service-specific ones)."""
    fields: dict[str, int] = {"max_message_bytes": settings.max_message_bytes}
    if isinstance(settings, ModelServerSettings):
        fields.update(
            max_batch_size=settings.max_batch_size,
            max_sequence_length=settings.max_sequence_length,
            max_queue_size=getattr(settings, "max_queue_size", 0),  # 0: the service has none
            max_text_bytes=max_text_bytes(settings.max_sequence_length),
        )
    fields.update(extra)
    return pb.Limits(**fields)


def server_info(
    service: str,
    settings: ServerSettings,
    started_at: float,
    loaded: LoadedModel | None = None,
    **extra_limits: int,
) -> pb.ServerInfo:
    """ServerInfo for ``service``; ``loaded`` fills in the model when there is one."""
    info = pb.ServerInfo(
        service=service,
        version=__version__,
        limits=limits(settings, **extra_limits),
        auth_required=settings.auth_token_file is not None,
        tls=settings.tls_cert is not None,
        uptime_seconds=time.time() - started_at,
    )
    if loaded is not None:
        info.model.CopyFrom(model_info(loaded))
    return info
