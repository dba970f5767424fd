"""Every service role starts, answers health per service name, reflection and GetInfo."""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from alignd.local import CLIENTS

ROLES = ["generation", "reward", "reference", "trainer"]


@pytest.mark.parametrize("role", ROLES)
def test_role_answers_health_reflection_and_get_info(serve, role, tiny_models):
    server = serve(role)
    client_cls = CLIENTS[role]
    with client_cls(server.target) as client:
        assert client.health() == "SERVING"
        info = client.info()
    server_info = info.server if hasattr(info, "server") else info
    assert server_info.service == client_cls.service
    assert server_info.limits.max_message_bytes == 64 * 1024 * 1024
    assert server_info.uptime_seconds >= 0
    if role == "trainer":
        assert not server_info.HasField("model")  # the model comes with Initialize
    else:
        expected = tiny_models.classifier if role == "reward" else tiny_models.causal_lm
        assert server_info.model.path == str(expected)
        assert server_info.model.num_parameters > 0
        assert server_info.model.vocab_size > 0
    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {client_cls.service, "grpc.health.v1.Health"} <= services


def test_generation_info_reports_engine_and_version(serve):
    server = serve("generation")
    with CLIENTS["generation"](server.target) as client:
        info = client.info()
    assert (info.engine, info.weights_version) == ("hf", 0)
    assert info.server.limits.max_new_tokens == 1024


def test_policy_side_tokenize_agrees_across_services(serve):
    prompts = [[{"role": "user", "content": "Name a colour."}], "plain text prompt"]
    completions = ["Blue.", None]
    rows = []
    for role in ("generation", "reference"):
        with CLIENTS[role](serve(role).target) as client:
            rows.append(client.tokenize(prompts, completions))
    for a, b in zip(*rows, strict=True):
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert a.prompt_length == b.prompt_length
    chat, plain = rows[0]
    assert chat.loss_mask[: chat.prompt_length].sum() == 0
    assert chat.loss_mask[chat.prompt_length :].all()
    assert plain.prompt_length == len(plain.input_ids)  # no completion: prompt only
