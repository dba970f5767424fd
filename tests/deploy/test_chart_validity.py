"""The chart lints strictly and renders manifests valid for Kubernetes 1.28 to 1.33.

Every rendered object is validated strictly (unknown fields are errors) against the
Kubernetes OpenAPI schemas of each version; the ServiceMonitor, a custom resource the
Kubernetes schemas do not know, against the Prometheus Operator CRD's schema shipped next to
this file. A kind neither knows fails the test instead of passing unchecked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chart_render import CHART, CI_VALUES, KUBE_VERSIONS, HelmError, run_helm

jsonschema = pytest.importorskip(
    "jsonschema", reason="jsonschema missing: pip install kubernetes-validate (brings it)"
)
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate missing: pip install kubernetes-validate"
)

SERVICEMONITOR_SCHEMA = json.loads(
    (Path(__file__).with_name("servicemonitor.schema.json")).read_text()
)
CUSTOM_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICEMONITOR_SCHEMA}


def validate(manifest: dict, kube_version: str) -> None:
    """Raises if ``manifest`` is not valid for ``kube_version`` (strict) or its kind is unknown."""
    key = (manifest["apiVersion"], manifest["kind"])
    if key in CUSTOM_SCHEMAS:
        jsonschema.validate(manifest, CUSTOM_SCHEMAS[key])
        return
    try:
        kubernetes_validate.validate(manifest, kube_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as err:
        pytest.fail(f"no schema for {key} in Kubernetes {kube_version}: {err.message}")


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.stem if v else "bare")
def test_helm_lint_strict_passes(helm, values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    output = run_helm(helm, *args)
    assert "1 chart(s) linted, 0 chart(s) failed" in output


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda v: v.stem)
def test_rendered_manifests_are_valid_kubernetes_objects(render, values, kube_version):
    manifests = render(values, kube_version=kube_version)
    assert manifests, "nothing rendered"
    for manifest in manifests:
        try:
            validate(manifest, kube_version)
        except jsonschema.ValidationError as err:
            name = f"{manifest['kind']}/{manifest['metadata']['name']}"
            pytest.fail(f"{values.name}, Kubernetes {kube_version}: {name}: {err.message}")


def test_the_validation_rejects_an_unknown_field(render):
    """The check above can fail: a misspelt field in a Deployment is an error."""
    deployment = next(m for m in render("default-values.yaml") if m["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(jsonschema.ValidationError, match="readinesProbe"):
        validate(broken, "1.30.0")


def test_servicemonitor_schema_rejects_what_the_crd_rejects(render):
    monitor = next(m for m in render("reward-only-values.yaml") if m["kind"] == "ServiceMonitor")
    validate(monitor, "1.30.0")
    for path, value in (("interval", "15 seconds"), ("scheme", "grpc"), ("portName", "x")):
        broken = json.loads(json.dumps(monitor))
        broken["spec"]["endpoints"][0][path] = value
        with pytest.raises(jsonschema.ValidationError):
            validate(broken, "1.30.0")
    broken = json.loads(json.dumps(monitor))
    del broken["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError, match="selector"):
        validate(broken, "1.30.0")
    broken = json.loads(json.dumps(monitor))  # the bearer token's Secret key is required
    del broken["spec"]["endpoints"][0]["authorization"]["credentials"]["key"]
    with pytest.raises(jsonschema.ValidationError, match="key"):
        validate(broken, "1.30.0")


def test_kubernetes_older_than_1_28_is_refused(helm):
    """Native gRPC probes and the pod-index label (the trainer's node rank) need 1.28."""
    with pytest.raises(HelmError, match="kubeVersion"):
        run_helm(helm, "template", "t", str(CHART), "--kube-version", "1.27.0")


def test_install_notes_say_where_each_enabled_service_listens(helm):
    notes = run_helm(
        helm, "install", "t", str(CHART), "--dry-run=client", "--namespace", "ml",
        "-f", str(CHART / "ci" / "multinode-trainer-values.yaml"),
    ).split("NOTES:", 1)[1]  # fmt: skip
    assert "t-alignd-generation.ml.svc:50051" in notes
    assert "t-alignd-trainer.ml.svc:50054" in notes
    assert "t-alignd-reward" not in notes  # switched off in these values
