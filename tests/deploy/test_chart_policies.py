"""The chart's shared objects: toggles, NetworkPolicy, reward PDB and HPA, Prometheus
scraping, auth and TLS secrets."""

from __future__ import annotations

import base64

import pytest
from chart_render import ROLES, component, config_env, container, find, workload

DRIVER = {"podSelector": {"matchLabels": {"alignd.io/role": "driver"}}}
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
PROMETHEUS = {
    **MONITORING,
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
METRICS_TOKEN = "9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a"
TRAINER_PODS = {
    "podSelector": {
        "matchLabels": {
            "app.kubernetes.io/name": "alignd",
            "app.kubernetes.io/instance": "t",
            "app.kubernetes.io/component": "trainer",
        }
    }
}


def objects_of(manifests: list[dict], role: str) -> list[str]:
    return [
        f"{m['kind']}/{m['metadata']['name']}"
        for m in manifests
        if m["metadata"]["name"].startswith(component(role))
    ]


@pytest.mark.parametrize("role", ROLES)
def test_each_service_is_switched_off_on_its_own(render, role):
    everything = render()
    assert objects_of(everything, role)
    without = render(sets=[f"{role}.enabled=false"])
    assert objects_of(without, role) == []
    for other in set(ROLES) - {role}:
        assert objects_of(without, other) == objects_of(everything, other)


def test_reward_only_renders_the_reward_service_and_shared_objects(render):
    manifests = render("reward-only-values.yaml")
    kinds = sorted(f"{m['kind']}/{m['metadata']['name']}" for m in manifests)
    assert kinds == [
        "ConfigMap/t-alignd-reward",
        "Deployment/t-alignd-reward",
        "HorizontalPodAutoscaler/t-alignd-reward",
        "NetworkPolicy/t-alignd-reward",
        "PodDisruptionBudget/t-alignd-reward",
        "Service/t-alignd-reward",
        "ServiceAccount/t-alignd",
        "ServiceMonitor/t-alignd",
    ]  # the existing claim is used, not created


def ingress(manifests: list[dict], role: str) -> list[dict]:
    policy = find(manifests, "NetworkPolicy", component(role))
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == role
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    return policy["spec"]["ingress"]


def grpc_rule(rules: list[dict]) -> dict:
    (rule,) = [r for r in rules if r.get("ports") == [{"port": "grpc", "protocol": "TCP"}]]
    return rule


def test_only_the_driver_and_the_trainer_reach_generation(render):
    rules = ingress(render(), "generation")
    assert grpc_rule(rules)["from"] == [DRIVER, TRAINER_PODS]
    assert all("ports" in r for r in rules)  # nothing else is open


def test_only_the_driver_reaches_the_trainer_whose_ranks_talk_among_themselves(render):
    rules = ingress(render(), "trainer")
    assert grpc_rule(rules)["from"] == [DRIVER]
    (ranks,) = [r for r in rules if "ports" not in r]
    assert ranks["from"] == [TRAINER_PODS]


def test_reward_is_public_by_default_and_restricted_as_configured(render):
    assert "from" not in grpc_rule(ingress(render(), "reward"))
    restricted = grpc_rule(ingress(render("reward-only-values.yaml"), "reward"))
    evals = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "evals"}}}
    assert restricted["from"] == [DRIVER, evals]
    assert grpc_rule(ingress(render(), "reference"))["from"] == [DRIVER]


def metrics_rules(manifests: list[dict], role: str) -> list[dict]:
    return [
        r
        for r in ingress(manifests, role)
        if r.get("ports") == [{"port": "metrics", "protocol": "TCP"}]
    ]


@pytest.mark.parametrize("role", ROLES)
def test_metrics_ports_admit_only_prometheus_pods_of_the_monitoring_namespace(render, role):
    (rule,) = metrics_rules(render(), role)
    assert rule["from"] == [PROMETHEUS]  # one peer: namespace and pod labels must both match


def test_metrics_ports_admit_the_configured_scrapers_instead(render):
    (rule,) = metrics_rules(render("reward-only-values.yaml"), "reward")
    assert rule["from"] == [MONITORING]


@pytest.mark.parametrize("role", ROLES)
def test_metrics_ports_are_open_to_anyone_only_when_asked(render, role):
    (rule,) = metrics_rules(render(sets=["networkPolicy.metricsFromAnywhere=true"]), role)
    assert "from" not in rule  # a rule without peers admits every source


def test_no_metrics_peers_close_the_metrics_ports(render, tmp_path):
    values = tmp_path / "closed.yaml"
    values.write_text("networkPolicy:\n  metricsFrom: []\n")
    manifests = render(values)
    for role in ROLES:
        rules = ingress(manifests, role)
        assert metrics_rules(manifests, role) == []
        open_to_all = [rule for rule in rules if "from" not in rule]
        assert open_to_all == ([grpc_rule(rules)] if role == "reward" else [])  # public reward


def test_network_policies_can_be_left_out(render):
    assert not [
        m for m in render(sets=["networkPolicy.enabled=false"]) if m["kind"] == "NetworkPolicy"
    ]


def test_reward_autoscales_and_survives_drains(render):
    manifests = render("reward-only-values.yaml")
    deployment = workload(manifests, "reward")
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    hpa = find(manifests, "HorizontalPodAutoscaler", "t-alignd-reward")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "t-alignd-reward",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    assert "cpu" in container(manifests, "reward")["resources"]["requests"]
    pdb = find(manifests, "PodDisruptionBudget", "t-alignd-reward")
    assert pdb["spec"]["maxUnavailable"] == "25%"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert workload(render(), "reward")["spec"]["replicas"] == 1


def test_services_carry_scrape_annotations_without_the_operator(render):
    manifests = render()
    assert not [m for m in manifests if m["kind"] == "ServiceMonitor"]
    for role in ROLES:
        service = find(manifests, "Service", component(role))
        assert service["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": config_env(manifests, role)["ALIGND_METRICS_PORT"],
            "prometheus.io/path": "/metrics",
            "prometheus.io/scheme": "http",
        }
    headless = find(manifests, "Service", "t-alignd-trainer-headless")
    assert "annotations" not in headless["metadata"]  # scraped once, through pod 0


def test_servicemonitor_selects_each_client_service_once(render):
    manifests = render(sets=["metrics.serviceMonitor.enabled=true"])
    monitor = find(manifests, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        m["metadata"]["name"]
        for m in manifests
        if m["kind"] == "Service" and selector.items() <= m["metadata"]["labels"].items()
    ]
    assert sorted(selected) == sorted(component(r) for r in ROLES)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/component"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    for name in selected:
        service = find(manifests, "Service", name)
        assert "metrics" in [p["name"] for p in service["spec"]["ports"]]
        assert "prometheus.io/scrape" not in service["metadata"].get("annotations", {})


def test_servicemonitor_presents_the_metrics_token_of_an_existing_secret(render):
    manifests = render("reward-only-values.yaml")
    (endpoint,) = find(manifests, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "reward-metrics-token", "key": "token"},
    }
    assert not [m for m in manifests if m["kind"] == "Secret"]  # the existing one is used
    volumes = {
        v["name"]: v for v in workload(manifests, "reward")["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["metrics-auth"]["secret"]["secretName"] == "reward-metrics-token"


def test_metrics_auth_mounts_the_token_every_service_requires_and_the_monitor_presents(render):
    sets = ["metrics.serviceMonitor.enabled=true", "metrics.auth.enabled=true"]
    manifests = render(sets=[*sets, f"metrics.auth.token={METRICS_TOKEN}"])
    secret = find(manifests, "Secret", "t-alignd-metrics-auth")
    assert secret["stringData"] == {"token": METRICS_TOKEN}
    (endpoint,) = find(manifests, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["authorization"]["credentials"] == {
        "name": "t-alignd-metrics-auth",
        "key": "token",
    }
    for role in ROLES:
        assert config_env(manifests, role)["ALIGND_METRICS_AUTH_TOKEN_FILE"] == (
            "/etc/alignd/metrics-auth/token"
        )
        pod = workload(manifests, role)["spec"]["template"]["spec"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "metrics-auth"]
        assert mount == {
            "name": "metrics-auth",
            "mountPath": "/etc/alignd/metrics-auth",
            "readOnly": True,
        }
        (volume,) = [v for v in pod["volumes"] if v["name"] == "metrics-auth"]
        assert volume["secret"]["secretName"] == "t-alignd-metrics-auth"
    (plain,) = find(render(sets=sets[:1]), "ServiceMonitor")["spec"]["endpoints"]
    assert "authorization" not in plain
    assert not [k for k in config_env(render(), "reward") if "METRICS_AUTH" in k]


def test_auth_and_mutual_tls_mount_their_secrets_where_the_settings_point(render):
    manifests = render("tls-auth-values.yaml")
    tokens = find(manifests, "Secret", "t-alignd-auth")["stringData"]["tokens"]
    assert tokens.splitlines() == [
        "3f9c2b7e51d04a8c9e6f1a2b3c4d5e6f",
        "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
    ]
    assert not [m for m in manifests if m["kind"] == "Secret" and "tls" in m["metadata"]["name"]]
    for role in ROLES:
        env = config_env(manifests, role)
        assert env["ALIGND_AUTH_TOKEN_FILE"] == "/etc/alignd/auth/tokens"
        assert (env["ALIGND_TLS_CERT"], env["ALIGND_TLS_KEY"], env["ALIGND_TLS_CLIENT_CA"]) == (
            "/etc/alignd/tls/tls.crt",
            "/etc/alignd/tls/tls.key",
            "/etc/alignd/tls/ca.crt",
        )
        volumes = {
            v["name"]: v for v in workload(manifests, role)["spec"]["template"]["spec"]["volumes"]
        }
        assert volumes["auth"]["secret"]["secretName"] == "t-alignd-auth"
        assert volumes["tls"]["secret"]["secretName"] == "alignd-tls"
    trainer = config_env(manifests, "trainer")
    assert trainer["ALIGND_PUSH_TOKEN_FILE"] == "/etc/alignd/auth/tokens"
    assert trainer["ALIGND_PUSH_TLS_CA"] == "/etc/alignd/tls/ca.crt"
    # Mutual TLS: the trainer's pushes present its certificate to the generation services.
    assert (trainer["ALIGND_PUSH_TLS_CERT"], trainer["ALIGND_PUSH_TLS_KEY"]) == (
        "/etc/alignd/tls/tls.crt",
        "/etc/alignd/tls/tls.key",
    )
    plain = config_env(render(), "reward")
    assert not [k for k in plain if "TLS" in k or "TOKEN" in k]


def test_inline_certificates_become_a_kubernetes_tls_secret(render, tmp_path):
    pem = {
        name: f"-----BEGIN {kind}-----\nMIIB{name}\n-----END {kind}-----\n"
        for name, kind in (("cert", "CERTIFICATE"), ("key", "PRIVATE KEY"), ("ca", "CERTIFICATE"))
    }
    values = tmp_path / "tls.yaml"
    values.write_text(
        "tls:\n  enabled: true\n"
        + "".join(
            f"  {name}: |\n" + "".join(f"    {line}\n" for line in text.splitlines())
            for name, text in pem.items()
        )
    )
    secret = find(render(values), "Secret", "t-alignd-tls")
    assert secret["type"] == "kubernetes.io/tls"
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {"tls.crt": pem["cert"], "tls.key": pem["key"], "ca.crt": pem["ca"]}
