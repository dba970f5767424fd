"""The alignd.v1 API: every service, RPC, message, field and enum value is documented, and every
service has GetInfo."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
SERVICES = {"GenerationService", "RewardService", "ReferenceService", "TrainerService"}


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("protos") / "set.pb"
    files = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "alignd" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", "--include_source_info"]
    assert protoc.main([*args, f"--descriptor_set_out={out}", *files]) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _undocumented(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Paths of elements without a leading comment (a oneof's comment covers its fields)."""
    comments = {
        tuple(loc.path): loc.leading_comments.strip()
        for loc in file.source_code_info.location
        if loc.leading_comments.strip()
    }
    missing = []

    def need(path: tuple[int, ...], name: str) -> None:
        if path not in comments:
            missing.append(f"{file.name}: {name}")

    def message(msg, path, prefix):
        need(path, prefix + msg.name)
        for i, field in enumerate(msg.field):
            in_oneof = field.HasField("oneof_index") and not field.proto3_optional
            if not in_oneof:
                need((*path, 2, i), f"{prefix}{msg.name}.{field.name}")
            elif (*path, 8, field.oneof_index) not in comments and (*path, 2, i) not in comments:
                missing.append(f"{file.name}: {prefix}{msg.name}.{field.name} (oneof)")
        for i, nested in enumerate(msg.nested_type):
            if not nested.options.map_entry:
                message(nested, (*path, 3, i), f"{prefix}{msg.name}.")
        for i, enum in enumerate(msg.enum_type):
            enum_type(enum, (*path, 4, i), f"{prefix}{msg.name}.")

    def enum_type(enum, path, prefix):
        need(path, prefix + enum.name)
        for i, value in enumerate(enum.value):
            if not value.name.endswith("_UNSPECIFIED"):
                need((*path, 2, i), f"{prefix}{enum.name}.{value.name}")

    for i, msg in enumerate(file.message_type):
        message(msg, (4, i), "")
    for i, enum in enumerate(file.enum_type):
        enum_type(enum, (5, i), "")
    for i, service in enumerate(file.service):
        need((6, i), service.name)
        for j, method in enumerate(service.method):
            need((6, i, 2, j), f"{service.name}.{method.name}")
    return missing


def test_every_element_of_the_api_is_documented(descriptor_set):
    missing = [m for f in descriptor_set.file for m in _undocumented(f)]
    assert not missing, "undocumented:\n" + "\n".join(missing)


def test_every_service_is_in_package_alignd_v1_and_has_get_info(descriptor_set):
    """alignd's own services; the Open Inference Protocol's keeps its package and RPCs (the
    protocol's names, so that its clients find it)."""
    own = [f for f in descriptor_set.file if not f.name.endswith("open_inference.proto")]
    services = {s.name: s for f in own for s in f.service}
    assert set(services) == SERVICES
    for f in own:
        assert f.package == "alignd.v1"
    for name, service in services.items():
        assert "GetInfo" in {m.name for m in service.method}, name
    (oip,) = [f for f in descriptor_set.file if f.name.endswith("open_inference.proto")]
    assert oip.package == "inference"
    assert [m.name for m in oip.service[0].method] == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    ]
