"""The chart's pods: probes, ports, settings, security context, GPUs, the multi-node trainer,
the generation services the trainer may push weights to.

The ALIGND_* variables are checked against the servers' own settings classes: a rendered
ConfigMap must build a valid settings object, so a value the chart passes under a wrong name
or with a wrong type fails here, not in a crash-looping pod.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from chart_render import (
    NAMESPACE,
    RELEASE,
    ROLES,
    component,
    config_env,
    container,
    find,
    workload,
)

from alignd.models import BUNDLED
from alignd_server.common.errors import InvalidArgument
from alignd_server.generation.config import GenerationSettings
from alignd_server.reference.config import ReferenceSettings
from alignd_server.reward.config import RewardSettings
from alignd_server.trainer.config import TrainerSettings
from alignd_server.trainer.targets import PushTargets, split_address

SETTINGS = {
    "generation": GenerationSettings,
    "reward": RewardSettings,
    "reference": ReferenceSettings,
    "trainer": TrainerSettings,
}
GRPC_SERVICE = {role: f"alignd.v1.{role.title()}Service" for role in ROLES}
PORTS = {"generation": 50051, "reward": 50052, "reference": 50053, "trainer": 50054}
CLIENT_ONLY = {"ALIGND_HOME"}
"""Variables that are not server settings (ALIGND_HOME: where bundled models are found)."""


def settings_from(env: dict[str, str], role: str, monkeypatch: pytest.MonkeyPatch):
    """The role's settings object built from ``env`` alone, as the server process builds it."""
    for name in [k for k in os.environ if k.startswith("ALIGND_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return SETTINGS[role]()


@pytest.mark.parametrize(
    "values",
    [
        "default-values.yaml",
        "gpu-vllm-values.yaml",
        "tls-auth-values.yaml",
        "multinode-trainer-values.yaml",
        "reward-only-values.yaml",
    ],
)
def test_every_config_variable_is_a_real_setting_the_server_accepts(render, values, monkeypatch):
    manifests = render(values)
    roles = [r for r in ROLES if any(m["metadata"]["name"] == component(r) for m in manifests)]
    assert roles
    for role in roles:
        env = config_env(manifests, role)
        fields = {f"ALIGND_{name.upper()}" for name in SETTINGS[role].model_fields}
        assert set(env) - CLIENT_ONLY <= fields, f"{role}: not settings: {set(env) - fields}"
        settings = settings_from(env, role, monkeypatch)
        assert settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0"
        main = container(manifests, role)
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        assert (settings.port, settings.metrics_port) == (ports["grpc"], ports["metrics"])
        mounts = {Path(m["mountPath"]) for m in main["volumeMounts"]}
        for name, value in settings:
            if isinstance(value, Path):  # a secret file: in a mounted directory
                assert value.parent in mounts, f"{role}: {name}={value} is not mounted"
            if name == "storage_root":  # the volume itself
                assert value == [Path(env["ALIGND_HOME"])] and set(value) <= mounts


def test_settings_values_reach_the_server_typed(render, monkeypatch):
    manifests = render("gpu-vllm-values.yaml", "reward-only-values.yaml")
    reward = settings_from(config_env(manifests, "reward"), "reward", monkeypatch)
    assert reward.max_batch_size == 128 and reward.max_wait_ms == 10.0
    assert reward.scorers == ["sentiment=function:alignd.tasks.sentiment:oracle_scorer"]
    assert (reward.device, reward.dtype) == ("cuda", "bfloat16")
    manifests = render("gpu-vllm-values.yaml")
    generation = settings_from(config_env(manifests, "generation"), "generation", monkeypatch)
    assert (generation.engine, generation.max_new_tokens) == ("vllm", 2048)


@pytest.mark.parametrize("role", ROLES)
def test_probes_ask_grpc_health_for_the_services_own_name(render, role):
    main = container(render(), role)
    grpc_port = next(p["containerPort"] for p in main["ports"] if p["name"] == "grpc")
    assert grpc_port == PORTS[role]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[kind]["grpc"] == {"port": grpc_port, "service": GRPC_SERVICE[role]}
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model loading


def test_over_tls_probes_run_the_health_script_with_the_pods_certificate(render):
    manifests = render("tls-auth-values.yaml")
    probe_config = find(manifests, "ConfigMap", "t-alignd-probe")
    assert "def main(" in probe_config["data"]["health_probe.py"]
    for role in ROLES:
        main = container(manifests, role)
        command = main["readinessProbe"]["exec"]["command"]
        assert command == [
            "python3",
            "/etc/alignd/probe/health_probe.py",
            GRPC_SERVICE[role],
            str(PORTS[role]),
            component(role),
            "/etc/alignd/tls",
            "mutual",
        ]
        mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
        assert mounts["probe"] == "/etc/alignd/probe" and mounts["tls"] == "/etc/alignd/tls"


def test_services_bind_all_interfaces_and_expose_grpc_and_metrics(render):
    manifests = render()
    for role in ROLES:
        service = find(manifests, "Service", component(role))
        ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
        assert ports == {
            "grpc": (PORTS[role], "grpc"),
            "metrics": (PORTS[role] - 50051 + 9091, "metrics"),
        }


@pytest.mark.parametrize("role", ROLES)
def test_pods_run_non_root_on_a_read_only_filesystem_without_capabilities(render, role):
    pod = workload(render(), role)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    main = pod["containers"][0]
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert volumes[mounts["/tmp"]]["emptyDir"] == {}
    assert volumes[mounts["/home/alignd/.cache"]]["emptyDir"] == {}


def test_models_volume_is_shared_writable_by_trainer_and_generation_only(render):
    manifests = render()
    for role in ROLES:
        pod = workload(manifests, role)["spec"]["template"]["spec"]
        (home,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "home"]
        assert home["mountPath"] == config_env(manifests, role)["ALIGND_HOME"]
        assert home["readOnly"] is (role in ("reward", "reference"))
        # The services that write take paths in requests, which must stay on the volume.
        writes = role in ("generation", "trainer")
        assert ("ALIGND_STORAGE_ROOT" in config_env(manifests, role)) is writes
        (volume,) = [v for v in pod["volumes"] if v["name"] == "home"]
        assert volume["persistentVolumeClaim"]["claimName"] == "t-alignd-home"
    claim = find(manifests, "PersistentVolumeClaim", "t-alignd-home")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_storage_root_follows_the_volumes_mount_path(render, monkeypatch):
    manifests = render(sets=["home.mountPath=/data/alignd"])
    for role in ("generation", "trainer"):
        settings = settings_from(config_env(manifests, role), role, monkeypatch)
        assert settings.storage_root == [Path("/data/alignd")]


def test_gpu_values_request_nvidia_gpus_and_a_memory_backed_shm(render):
    manifests = render("gpu-vllm-values.yaml")
    gpus = {r: container(manifests, r)["resources"]["limits"].get("nvidia.com/gpu") for r in ROLES}
    assert gpus == {"generation": 1, "reward": 1, "reference": 1, "trainer": 4}
    generation = workload(manifests, "generation")["spec"]["template"]["spec"]
    assert generation["containers"][0]["image"] == "registry.example.com/alignd:0.1.0-cuda"
    assert generation["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        generation["tolerations"]
    )
    (shm,) = [v for v in generation["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert config_env(manifests, "trainer")["ALIGND_NPROC"] == "4"
    cpu_only = render()
    assert "nvidia.com/gpu" not in container(cpu_only, "generation")["resources"]["limits"]


def test_multi_node_trainer_meets_at_pod_zero_of_its_headless_service(render):
    manifests = render("multinode-trainer-values.yaml")
    trainer = workload(manifests, "trainer")
    headless = find(manifests, "Service", "t-alignd-trainer-headless")
    assert trainer["spec"]["serviceName"] == "t-alignd-trainer-headless"
    assert trainer["spec"]["replicas"] == 3
    assert trainer["spec"]["podManagementPolicy"] == "Parallel"
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # ranks meet before SERVING
    env = config_env(manifests, "trainer")
    assert env["ALIGND_NNODES"] == "3" and env["ALIGND_NPROC"] == "2"
    assert env["ALIGND_MASTER_ADDR"] == (
        f"t-alignd-trainer-0.t-alignd-trainer-headless.{NAMESPACE}.svc.cluster.local"
    )
    main = container(manifests, "trainer")
    rendezvous = next(p["containerPort"] for p in main["ports"] if p["name"] == "rendezvous")
    assert env["ALIGND_MASTER_PORT"] == str(rendezvous) == "29400"
    (rank,) = [e for e in main["env"] if e["name"] == "ALIGND_NODE_RANK"]
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    assert "exec" in main["readinessProbe"]  # nodes other than 0 serve no gRPC
    client = find(manifests, "Service", "t-alignd-trainer")
    assert client["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "t-alignd-trainer-0"


@pytest.mark.parametrize("model", sorted(BUNDLED))
def test_prepare_init_container_prepares_bundled_models_under_a_lock(render, model):
    manifests = render(sets=["models.prepare=true", f"reward.model={model}"])
    pod = workload(manifests, "reward")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == [
        "flock",
        "/var/lib/alignd/.prepare.lock",
        "alignd",
        "models",
        "prepare",
        model,
    ]
    assert {"name": "home", "mountPath": "/var/lib/alignd"} in init["volumeMounts"]  # writable
    assert init["securityContext"]["readOnlyRootFilesystem"] is True


def test_a_model_directory_needs_no_prepare(render):
    manifests = render(sets=["models.prepare=true", "reward.model=/var/lib/alignd/rm"])
    assert "initContainers" not in workload(manifests, "reward")["spec"]["template"]["spec"]


def test_config_changes_roll_the_pods(render):
    before = workload(render(), "reward")["spec"]["template"]["metadata"]["annotations"]
    after = workload(render(sets=["reward.settings.max_batch_size=8"]), "reward")
    assert (
        after["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        != (before["checksum/config"])
    )


GENERATION = f"{RELEASE}-alignd-generation"
OWN_GENERATION = [
    f"{GENERATION}.{NAMESPACE}.svc:50051",  # what `alignd submit` gives jobs
    f"{GENERATION}.{NAMESPACE}.svc.cluster.local:50051",
    f"{GENERATION}-headless.{NAMESPACE}.svc.cluster.local:50051",  # records: the ready pods
]


def push_targets(manifests: list[dict], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return settings_from(config_env(manifests, "trainer"), "trainer", monkeypatch).push_targets


def test_the_trainer_may_push_to_the_release_generation_service_and_its_pods(render, monkeypatch):
    manifests = render()
    targets = push_targets(manifests, monkeypatch)
    assert targets == OWN_GENERATION
    for target in targets:  # each names a rendered Service, on its gRPC port
        host, port = split_address(target)
        name, namespace = host.split(".")[:2]
        service = find(manifests, "Service", name)
        assert namespace == NAMESPACE
        assert port in [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
    headless = find(manifests, "Service", f"{GENERATION}-headless")
    client = find(manifests, "Service", GENERATION)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False  # pushes go to ready pods
    assert headless["spec"]["selector"] == client["spec"]["selector"]
    pod_labels = workload(manifests, "generation")["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    assert "alignd.io/metrics" not in headless["metadata"]["labels"]  # scraped through client


def test_the_generation_replicas_alignd_submit_gives_jobs_are_allowed(render, monkeypatch):
    pytest.importorskip("kubernetes", reason="kubernetes client missing: pip install kubernetes")
    from alignd import kube
    from alignd.jobs import PPOConfig

    job_config = PPOConfig(name="tune", data={"path": "/data/prompts.jsonl"})
    options = kube.SubmitOptions(release=RELEASE, namespace=NAMESPACE)
    _, job = kube.to_manifests(kube.build_objects(job_config, options, "job-1"))
    (driver,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in driver["env"]}
    manifests = render()
    targets = push_targets(manifests, monkeypatch)
    # The job finds the replicas through the headless Service (its records are the ready
    # pods); the trainer allows the addresses the same Service's full name resolves to.
    name, port = env["ALIGND_GENERATION_DNS"].rsplit(":", 1)
    assert "ALIGND_GENERATION_TARGET" not in env
    assert name == f"{GENERATION}-headless.{NAMESPACE}.svc"
    find(manifests, "Service", f"{GENERATION}-headless")
    assert f"{name}.cluster.local:{port}" in targets
    allowed = PushTargets(targets)
    with pytest.raises(InvalidArgument, match="not an allowed push target"):
        asyncio.run(allowed.check([env["ALIGND_REWARD_TARGET"]]))


def test_push_targets_add_to_the_release_generation_service_or_stand_alone(render, monkeypatch):
    extra = ["gen.other.svc:50051", "10.0.0.7:50051", "[fd00::7]:50051"]
    sets = [f"trainer.pushTargets[{i}]={target}" for i, target in enumerate(extra)]
    assert push_targets(render(sets=sets), monkeypatch) == OWN_GENERATION + extra
    alone = render(sets=[*sets, "generation.enabled=false"])
    assert push_targets(alone, monkeypatch) == extra
    assert not [m for m in alone if m["metadata"]["name"].startswith(GENERATION)]
    nowhere = render(sets=["generation.enabled=false"])
    assert push_targets(nowhere, monkeypatch) == []  # every push is refused
