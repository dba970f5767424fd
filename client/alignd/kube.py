"""Jobs in a Kubernetes cluster: ``alignd submit`` and :meth:`alignd.Platform.from_kubernetes`.

``alignd submit job.yaml --release R --namespace N`` builds a ConfigMap holding the job config
and a Job whose pod runs ``alignd run --env --resume`` against the services of Helm release R:
their addresses come as ``ALIGND_*_TARGET`` variables (generation's as
``ALIGND_GENERATION_DNS``: the release's headless Service, whose records are the replicas), the
run directory lives on the release's shared volume (mounted where the services mount it, so
checkpoint paths mean the same on the driver and the trainer), and the auth token (and TLS CA)
come from the release's Secrets. The pod carries the ``alignd.io/role: driver`` label the
chart's NetworkPolicy admits. Kubernetes objects are built with the ``kubernetes`` client's
models (``pip install 'alignd[kubernetes]'``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignd import __version__
from alignd.jobs.config import JobConfig

ROLES = ("generation", "reward", "reference", "trainer")
PORTS = {"generation": 50051, "reward": 50052, "reference": 50053, "trainer": 50054}
"""The chart's default gRPC ports."""
PART_OF = "app.kubernetes.io/part-of=alignd"


def _client():
    try:
        import kubernetes
    except ImportError as err:
        raise SystemExit(
            "Kubernetes support needs the kubernetes client: pip install 'alignd[kubernetes]'"
        ) from err
    return kubernetes


def fullname(release: str, chart: str = "alignd") -> str:
    """The chart's ``alignd.fullname``: the release name if it contains the chart's name."""
    return release if chart in release else f"{release}-{chart}"[:63].rstrip("-")


@dataclass(frozen=True)
class SubmitOptions:
    """Where and how the job runs.

    Attributes:
        release: the Helm release whose services the job uses.
        namespace: its namespace.
        image: the alignd image (default ``alignd:<version>``).
        claim: the shared PVC (default the chart's ``<fullname>-home``).
        mount_path: where the PVC is mounted (the chart's ``home.mountPath``).
        auth_secret: the Secret with the bearer ``tokens`` (empty: no auth).
        tls_secret: the Secret with ``ca.crt`` (empty: plaintext).
        service_account: the pod's service account (empty: the namespace default).
    """

    release: str
    namespace: str = "default"
    image: str = ""
    claim: str = ""
    mount_path: str = "/var/lib/alignd"
    auth_secret: str = ""
    tls_secret: str = ""
    service_account: str = ""


def job_name(config: JobConfig, now: float | None = None) -> str:
    """``alignd-<kind>-<name>-<stamp>``, a valid DNS label."""
    stamp = hashlib.sha1(str(now or time.time()).encode()).hexdigest()[:6]
    base = f"alignd-{config.kind}-{config.name}".replace("_", "-").lower()
    return f"{base[:50].rstrip('-')}-{stamp}"


def build_objects(config: JobConfig, options: SubmitOptions, name: str) -> list[Any]:
    """The ConfigMap (job config) and the Job that runs it."""
    k = _client().client
    full = fullname(options.release)
    run_dir = Path(options.mount_path) / "runs" / name
    document = {**config.model_dump(mode="json"), "run_dir": str(run_dir)}
    labels = {"app.kubernetes.io/part-of": "alignd", "app.kubernetes.io/instance":
              options.release, "app.kubernetes.io/component": "job", "alignd.io/role": "driver",
              "alignd.io/job": name}  # fmt: skip
    config_map = k.V1ConfigMap(
        api_version="v1", kind="ConfigMap",
        metadata=k.V1ObjectMeta(name=name, namespace=options.namespace, labels=labels),
        data={"job.yaml": yaml.safe_dump(document)},
    )  # fmt: skip
    # Generation by its headless Service: its DNS records are the ready pods, so the job
    # samples from and pushes to each replica (a ClusterIP would pin one connection to one pod).
    env = [k.V1EnvVar(name=f"ALIGND_{role.upper()}_TARGET",
                      value=f"{full}-{role}.{options.namespace}.svc:{PORTS[role]}")
           for role in ROLES if role != "generation"]  # fmt: skip
    env.insert(0, k.V1EnvVar(
        name="ALIGND_GENERATION_DNS",
        value=f"{full}-generation-headless.{options.namespace}.svc:{PORTS['generation']}",
    ))  # fmt: skip
    env.append(k.V1EnvVar(name="ALIGND_HOME", value=options.mount_path))
    mounts = [k.V1VolumeMount(name="job", mount_path="/etc/alignd/job", read_only=True),
              k.V1VolumeMount(name="home", mount_path=options.mount_path),
              k.V1VolumeMount(name="tmp", mount_path="/tmp")]  # fmt: skip
    volumes = [
        k.V1Volume(name="job", config_map=k.V1ConfigMapVolumeSource(name=name)),
        k.V1Volume(name="home", persistent_volume_claim=k.V1PersistentVolumeClaimVolumeSource(
            claim_name=options.claim or f"{full}-home")),
        k.V1Volume(name="tmp", empty_dir=k.V1EmptyDirVolumeSource()),
    ]  # fmt: skip
    for secret, path, variable, key in (
        (options.auth_secret, "/etc/alignd/auth", "ALIGND_TOKEN_FILE", "tokens"),
        (options.tls_secret, "/etc/alignd/tls", "ALIGND_TLS_CA", "ca.crt"),
    ):
        if secret:
            volume = secret.replace(".", "-")[:63]
            volumes.append(
                k.V1Volume(name=volume, secret=k.V1SecretVolumeSource(secret_name=secret))
            )
            mounts.append(k.V1VolumeMount(name=volume, mount_path=path, read_only=True))
            env.append(k.V1EnvVar(name=variable, value=f"{path}/{key}"))
    container = k.V1Container(
        name="driver", image=options.image or f"alignd:{__version__}",
        args=["run", "/etc/alignd/job/job.yaml", "--env", "--resume"],
        env=env, volume_mounts=mounts,
        security_context=k.V1SecurityContext(
            run_as_non_root=True, read_only_root_filesystem=True,
            allow_privilege_escalation=False,
            capabilities=k.V1Capabilities(drop=["ALL"]),
            seccomp_profile=k.V1SeccompProfile(type="RuntimeDefault"),
        ),
        resources=k.V1ResourceRequirements(requests={"cpu": "500m", "memory": "1Gi"}),
    )  # fmt: skip
    pod = k.V1PodSpec(
        restart_policy="Never", containers=[container], volumes=volumes,
        service_account_name=options.service_account or None,
        security_context=k.V1PodSecurityContext(run_as_non_root=True, run_as_user=10001,
                                                fs_group=10001),
    )  # fmt: skip
    job = k.V1Job(
        api_version="batch/v1", kind="Job",
        metadata=k.V1ObjectMeta(name=name, namespace=options.namespace, labels=labels),
        spec=k.V1JobSpec(
            backoff_limit=3,  # a retried pod resumes from the run's last checkpoint
            ttl_seconds_after_finished=7 * 24 * 3600,
            template=k.V1PodTemplateSpec(metadata=k.V1ObjectMeta(labels=labels), spec=pod),
        ),
    )  # fmt: skip
    return [config_map, job]


def to_manifests(objects: list[Any]) -> list[dict]:
    """The objects as plain manifests (what ``kubectl apply`` reads)."""
    serialize = _client().client.ApiClient().sanitize_for_serialization
    return [serialize(o) for o in objects]


def submit(objects: list[Any], api_client=None) -> list[str]:
    """Creates the ConfigMap, then the Job; returns their names."""
    k = _client()
    if api_client is None:
        api_client = _load_api_client(k)
    config_map, job = objects
    namespace = job.metadata.namespace
    k.client.CoreV1Api(api_client).create_namespaced_config_map(namespace, config_map)
    k.client.BatchV1Api(api_client).create_namespaced_job(namespace, job)
    return [config_map.metadata.name, job.metadata.name]


def _load_api_client(k):
    try:
        k.config.load_incluster_config()
    except k.config.ConfigException:
        k.config.load_kube_config()
    return k.client.ApiClient()


def discover(release: str, namespace: str, api_client=None) -> dict[str, list[str]]:
    """Targets of a release's services, found by label: generation replicas by pod address
    (from the Service's EndpointSlices, so weight pushes reach every replica), the other
    services by their Service's DNS name."""
    k = _client()
    if api_client is None:
        api_client = _load_api_client(k)
    core, discovery = k.client.CoreV1Api(api_client), k.client.DiscoveryV1Api(api_client)
    selector = f"{PART_OF},app.kubernetes.io/instance={release}"
    targets: dict[str, list[str]] = {}
    for service in core.list_namespaced_service(namespace, label_selector=selector).items:
        role = (service.metadata.labels or {}).get("app.kubernetes.io/component")
        grpc = [p.port for p in service.spec.ports or [] if p.name == "grpc"]
        if role not in ROLES or not grpc or service.spec.cluster_ip == "None":
            continue
        name = service.metadata.name
        if role == "generation":
            slices = discovery.list_namespaced_endpoint_slice(
                namespace, label_selector=f"kubernetes.io/service-name={name}"
            )
            targets[role] = sorted(
                f"{address}:{grpc[0]}"
                for s in slices.items for e in s.endpoints or []
                if e.conditions is None or e.conditions.ready is not False
                for address in e.addresses
            )  # fmt: skip
        else:
            targets[role] = [f"{name}.{namespace}.svc:{grpc[0]}"]
    return targets
