"""``alignd submit`` and ``Platform.from_kubernetes``: the objects built, validated against the
Kubernetes schemas, and the calls the kubernetes client makes, answered by a recording HTTP
server on loopback (no API server can run here)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import yaml

from alignd import Platform
from alignd.jobs import PPOConfig

kubernetes = pytest.importorskip("kubernetes")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
from alignd import kube  # noqa: E402

CONFIG = PPOConfig(name="tune", data={"path": "/data/prompts.jsonl"}, rounds=3)


def manifests(**options):
    objects = kube.build_objects(
        CONFIG, kube.SubmitOptions(release="prod", namespace="rlhf", **options), "job-1"
    )
    return kube.to_manifests(objects)


@pytest.mark.parametrize("version", ["1.28.0", "1.30.0", "1.33.0"])
def test_submitted_objects_validate_strictly(version):
    for manifest in manifests(auth_secret="prod-alignd-auth", tls_secret="prod-alignd-tls"):
        kubernetes_validate.validate(manifest, version, strict=True)


def test_the_job_runs_the_config_against_the_release(tmp_path):
    config_map, job = manifests(auth_secret="prod-alignd-auth")
    document = yaml.safe_load(config_map["data"]["job.yaml"])
    assert document["kind"] == "ppo" and document["rounds"] == 3
    assert document["run_dir"] == "/var/lib/alignd/runs/job-1"  # on the shared volume
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["run", "/etc/alignd/job/job.yaml", "--env", "--resume"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ALIGND_TRAINER_TARGET"] == "prod-alignd-trainer.rlhf.svc:50054"
    assert env["ALIGND_GENERATION_DNS"] == "prod-alignd-generation-headless.rlhf.svc:50051"
    assert "ALIGND_GENERATION_TARGET" not in env  # a ClusterIP pins one connection to one pod
    assert env["ALIGND_TOKEN_FILE"] == "/etc/alignd/auth/tokens"
    assert job["spec"]["template"]["metadata"]["labels"]["alignd.io/role"] == "driver"
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v]  # fmt: skip
    assert claims == ["prod-alignd-home"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["capabilities"]["drop"] == ["ALL"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_submit_dry_run_prints_the_manifests(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"kind": "sft", "data": {"path": "/data/sft.jsonl"}}))
    result = subprocess.run(
        [sys.executable, "-m", "alignd.cli", "submit", str(path), "--release", "r1",
         "--namespace", "ns", "--dry-run"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.31.0", strict=True)


class FakeAPI(BaseHTTPRequestHandler):
    """Records each request and answers like the API server would."""

    calls: ClassVar[list[tuple[str, str, dict | None]]] = []
    responses: ClassVar[dict[str, dict]] = {}

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append(("POST", self.path, body))
        self._answer(201, body)

    def do_GET(self):
        self.calls.append(("GET", self.path, None))
        path = self.path.split("?")[0]
        self._answer(200, self.responses.get(path, {"kind": "List", "items": []}))

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    FakeAPI.calls, FakeAPI.responses = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield kubernetes.client.ApiClient(configuration)
    finally:
        server.shutdown()
        server.server_close()


def test_submit_creates_the_config_map_then_the_job(api):
    objects = kube.build_objects(CONFIG, kube.SubmitOptions(release="prod", namespace="rlhf"),
                                 "job-1")  # fmt: skip
    assert kube.submit(objects, api) == ["job-1", "job-1"]
    assert [(m, p) for m, p, _ in FakeAPI.calls] == [
        ("POST", "/api/v1/namespaces/rlhf/configmaps"),
        ("POST", "/apis/batch/v1/namespaces/rlhf/jobs"),
    ]
    assert FakeAPI.calls[1][2]["spec"]["backoffLimit"] == 3


def _service(name, role, port, cluster_ip="10.0.0.1"):
    ports = [{"name": "grpc", "port": port}, {"name": "metrics", "port": 9090}]
    labels = {"app.kubernetes.io/component": role}
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"clusterIP": cluster_ip, "ports": ports}}  # fmt: skip


def test_platform_from_kubernetes_finds_the_services_by_label(api):
    FakeAPI.responses = {
        "/api/v1/namespaces/rlhf/services": {"kind": "ServiceList", "items": [
            _service("prod-alignd-generation", "generation", 50051),
            _service("prod-alignd-reward", "reward", 50052),
            _service("prod-alignd-trainer", "trainer", 50054),
            _service("prod-alignd-trainer-headless", "trainer", 50054, cluster_ip="None"),
        ]},
        "/apis/discovery.k8s.io/v1/namespaces/rlhf/endpointslices": {
            "kind": "EndpointSliceList", "items": [{
                "addressType": "IPv4", "metadata": {"name": "gen-abc"},
                "endpoints": [
                    {"addresses": ["10.1.0.5"], "conditions": {"ready": True}},
                    {"addresses": ["10.1.0.4"], "conditions": {"ready": True}},
                    {"addresses": ["10.1.0.9"], "conditions": {"ready": False}},
                ],
            }]},
    }  # fmt: skip
    with Platform.from_kubernetes("prod", "rlhf", api_client=api) as platform:
        assert platform.generation_targets == ["10.1.0.4:50051", "10.1.0.5:50051"]
        assert platform.targets["reward"] == ["prod-alignd-reward.rlhf.svc:50052"]
        assert platform.targets["trainer"] == ["prod-alignd-trainer.rlhf.svc:50054"]
        assert not platform.targets.get("reference")
    from urllib.parse import unquote

    paths = [unquote(p) for _, p, _ in FakeAPI.calls]
    assert paths == [
        "/api/v1/namespaces/rlhf/services?labelSelector="
        "app.kubernetes.io/part-of=alignd,app.kubernetes.io/instance=prod",
        "/apis/discovery.k8s.io/v1/namespaces/rlhf/endpointslices?labelSelector="
        "kubernetes.io/service-name=prod-alignd-generation",
    ]
