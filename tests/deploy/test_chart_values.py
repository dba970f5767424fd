"""values.schema.json: strict, complete, faithful to the servers' settings, and its errors clear.

A value the chart does not know, or one a server would refuse, fails at ``helm install`` time
with a message that names the value, rather than as a crash-looping pod.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import yaml
from chart_render import CHART, ROLES, HelmError, config_env

from alignd_server.generation.config import GenerationSettings
from alignd_server.reference.config import ReferenceSettings
from alignd_server.reward.config import RewardSettings
from alignd_server.trainer.config import TrainerSettings
from alignd_server.trainer.targets import split_address

jsonschema = pytest.importorskip(
    "jsonschema", reason="jsonschema missing: pip install kubernetes-validate (brings it)"
)
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
README = (CHART / "README.md").read_text()
SETTINGS = {
    "generation": GenerationSettings,
    "reward": RewardSettings,
    "reference": ReferenceSettings,
    "trainer": TrainerSettings,
}
# Settings the chart derives from other values (ports, model, log level, mounted secrets,
# the volume, the trainer's nodes and push targets); `<service>.settings` holds all the others,
# and refuses these, so that no setting has two sources.
DERIVED = {"host", "port", "metrics_host", "metrics_port", "model", "log_level"}
DERIVED |= {"auth_token_file", "tls_cert", "tls_key", "tls_client_ca", "metrics_auth_token_file"}
STORAGE_DERIVED = {"storage_root"}
TRAINER_DERIVED = {"push_token_file", "push_tls_ca", "push_tls_cert", "push_tls_key"}
TRAINER_DERIVED |= {"nnodes", "node_rank"}
TRAINER_DERIVED |= {"master_addr", "master_port", "push_targets"}
ROLE_DERIVED = {
    "generation": STORAGE_DERIVED,
    "reward": set(),
    "reference": set(),
    "trainer": STORAGE_DERIVED | TRAINER_DERIVED,
}
CONSTRAINTS = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum")
PUSH_TARGET = "at '/trainer/pushTargets/0': '{}' does not match pattern"

# (--set flags, what the error message must say)
BAD_VALUES = [
    (["rewards.enabled=false"], "additional properties 'rewards' not allowed"),
    (["trainer.settings.nprocs=2"], "additional properties 'nprocs' not allowed"),
    (["reward.replicas=-1"], "at '/reward/replicas': minimum: got -1, want 0"),
    (["trainer.replicas=0"], "at '/trainer/replicas': minimum: got 0, want 1"),
    (["reward.settings.dtype=float8"], "value must be one of 'float32', 'bfloat16', 'float16'"),
    (["generation.settings.engine=tgi"], "at '/generation/settings/engine'"),
    (["reward.settings.max_batch_size=0"], "at '/reward/settings/max_batch_size': minimum"),
    (["reward.ports.grpc=70000"], "at '/reward/ports/grpc': maximum: got 70,000, want 65,535"),
    (["auth.tokens[0]=short"], "at '/auth/tokens/0': minLength: got 5, want 16"),
    (["podSecurityContext.runAsNonRoot=false"], "at '/podSecurityContext/runAsNonRoot'"),
    (
        ["containerSecurityContext.readOnlyRootFilesystem=false"],
        "at '/containerSecurityContext/readOnlyRootFilesystem': value must be true",
    ),
    (["generation.resources.limits.memory=lots"], "'lots' does not match pattern"),
    (["metrics.serviceMonitor.interval=30 seconds"], "at '/metrics/serviceMonitor/interval'"),
    (["reward.tolerations[0].operator=Maybe"], "value must be one of 'Exists', 'Equal'"),
    (["reward.autoscaling.targetCPUUtilizationPercentage=150"], "maximum: got 150, want 100"),
    (["generation.settings.max_connection_idle_s=0"], "exclusiveMinimum: got 0, want 0"),
    (["reward.settings.max_concurrent_streams=70000"], "maximum: got 70,000, want 65,536"),
    (["generation.settings.storage_root=/data"], "additional properties 'storage_root'"),
    (["trainer.settings.push_targets=gen:50051"], "additional properties 'push_targets'"),
    (["reward.settings.metrics_auth_token_file=/t"], "properties 'metrics_auth_token_file'"),
    (["trainer.pushTargets[0]=dns:///gen:50051"], PUSH_TARGET.format("dns:///gen:50051")),
    (["trainer.pushTargets[0]=gen.ml.svc"], PUSH_TARGET.format("gen.ml.svc")),
    (["trainer.pushTargets[0]=gen:0"], PUSH_TARGET.format("gen:0")),
    (["trainer.pushTargets[0]=gen:65536"], PUSH_TARGET.format("gen:65536")),
    (["trainer.pushTargets[0]=fd00::1:50051"], PUSH_TARGET.format("fd00::1:50051")),
    (["metrics.auth.token=short"], "at '/metrics/auth/token': minLength: got 5, want 16"),
    (["networkPolicy.metricsFromAnywhere=yes"], "at '/networkPolicy/metricsFromAnywhere'"),
]

# Values whose inconsistency only the templates can see.
BAD_COMBINATIONS = [
    (["auth.enabled=true"], "auth.enabled needs auth.tokens, or auth.existingSecret"),
    (["tls.enabled=true"], "tls.enabled needs tls.cert, tls.key and tls.ca"),
    (["tls.mutual=true"], "tls.mutual (clients must present certificates) needs tls.enabled"),
    (
        ["metrics.auth.enabled=true"],
        "metrics.auth.enabled needs metrics.auth.token, or metrics.auth.existingSecret",
    ),
    (
        ["reward.autoscaling.enabled=true", "reward.autoscaling.maxReplicas=2",
         "reward.autoscaling.minReplicas=3"],
        "reward.autoscaling.maxReplicas (2) is below minReplicas (3)",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("sets", "message"), BAD_VALUES + BAD_COMBINATIONS, ids=str)
def test_bad_values_are_refused_with_a_message_naming_them(render, sets, message):
    with pytest.raises(HelmError) as refused:
        render(sets=sets)
    assert message in str(refused.value)


def test_a_setting_left_unset_by_null_is_refused_as_the_environment_cannot_carry_it(
    render, tmp_path
):
    values = tmp_path / "null.yaml"
    values.write_text("reward:\n  settings:\n    max_connection_age_s: null\n")
    with pytest.raises(HelmError) as refused:
        render(values)
    assert "at '/reward/settings/max_connection_age_s': got null, want number" in str(refused.value)


@pytest.mark.parametrize(
    "target", ["gen.ml.svc:50051", "10.0.0.7:50051", "[fd00::7]:50051", "gen-0:1", "g:65535"]
)
def test_push_targets_the_trainer_accepts_pass_the_schema(render, target):
    split_address(target)  # the trainer's own parser takes it
    env = config_env(render(sets=[f"trainer.pushTargets[0]={target}"]), "trainer")
    assert json.loads(env["ALIGND_PUSH_TARGETS"])[-1] == target


def test_the_schema_is_valid_and_accepts_the_defaults():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.Draft7Validator(SCHEMA).validate(VALUES)


def _objects(node: object, path: str = "") -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield path, node
        for key, child in node.items():
            yield from _objects(child, f"{path}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _objects(child, f"{path}/{i}")


def test_every_object_the_chart_defines_forbids_unknown_keys():
    checked = 0
    for path, node in _objects(SCHEMA):
        if "properties" in node:
            assert node.get("additionalProperties") is False, path
            checked += 1
        else:  # a string map, or a Kubernetes object passed through (validated by Kubernetes)
            passed_through = "Kubernetes" in node.get("description", "") or path.endswith(
                ("Selector", "/valueFrom")
            )
            assert "additionalProperties" in node or passed_through, path
    assert checked > 40


def _resolve(node: dict) -> dict:
    while "$ref" in node:
        node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _schema_at(path: tuple[str, ...]) -> dict:
    node = _resolve(SCHEMA)
    for depth, key in enumerate(path):
        properties = node.get("properties", {})
        assert key in properties, f"{'.'.join(path[:depth])}: the schema has no {key!r}"
        node = _resolve(properties[key])
    return node


def _value_paths(values: object, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Paths of the values in values.yaml, down to what the schema treats as one value (a
    scalar, a list, a string map)."""
    if isinstance(values, dict) and values and "properties" in _schema_at(path):
        for key, child in values.items():
            yield from _value_paths(child, (*path, key))
    else:
        yield path


def test_the_schema_describes_every_value_in_values_yaml():
    paths = list(_value_paths(VALUES))  # _schema_at fails on a value without a schema
    assert len(paths) > 100


def _as_variable(spec: dict) -> dict:
    """The server's schema of a setting as an ALIGND_* variable can carry it: a nullable
    setting (``float | None``) by its non-null type, since the environment cannot say None (the
    chart leaves the setting out instead, for the server's default)."""
    branches = [b for b in spec.get("anyOf", ()) if b.get("type") != "null"]
    return branches[0] if len(branches) == 1 else spec


@pytest.mark.parametrize("role", ROLES)
def test_service_settings_are_the_servers_settings_with_their_limits(role):
    cls = SETTINGS[role]
    chart = _schema_at((role, "settings"))["properties"]
    derived = DERIVED | ROLE_DERIVED[role]
    assert set(chart) == set(cls.model_fields) - derived
    server = cls.model_json_schema()["properties"]
    for name, spec in chart.items():
        expected = {k: v for k, v in _as_variable(server[name]).items() if k in CONSTRAINTS}
        if "enum" in expected:
            expected.pop("type", None)
        assert {k: v for k, v in spec.items() if k in CONSTRAINTS} == expected, name


def test_readme_documents_every_value_and_setting():
    documented = set(re.findall(r"^\| `([^`]+)` \|", README, re.MULTILINE))  # first column
    missing = []
    for path in _value_paths(VALUES):
        if path[0] in ROLES and len(path) > 2 and path[1] == "settings":
            continue  # the settings table below
        generic = ".".join(("<service>", *path[1:]))
        if ".".join(path) not in documented and generic not in documented:
            missing.append(".".join(path))
    for role in ROLES:
        settings = _schema_at((role, "settings"))["properties"]
        missing += [name for name in settings if name not in documented]
    assert not missing, f"README.md does not document: {missing}"
