"""Rendering the chart with helm, and finding objects in what it renders.

Rendering goes through the real ``helm template`` (values checked against values.schema.json,
templates executed); results are cached per (values files, --set flags, Kubernetes version),
so the many assertions on one rendering cost one helm run.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import yaml
from deploy_tools import REPO

CHART = REPO / "helm" / "alignd"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSIONS = ("1.28.0", "1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")
RELEASE, NAMESPACE = "t", "ml"
ROLES = ("generation", "reward", "reference", "trainer")

Manifest = dict[str, Any]


class HelmError(RuntimeError):
    """helm exited non-zero; the message is its stderr."""


def run_helm(helm: str, *args: str) -> str:
    """Runs helm, returns stdout; raises :class:`HelmError` with stderr on failure."""
    done = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise HelmError(done.stderr.strip())
    return done.stdout


@functools.cache
def render_chart(
    helm: str, values: tuple[Path, ...], sets: tuple[str, ...], kube_version: str
) -> tuple[Manifest, ...]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    args += ["--kube-version", kube_version]
    for path in values:
        args += ["-f", str(path)]
    for flag in sets:
        args += ["--set", flag]
    return tuple(d for d in yaml.safe_load_all(run_helm(helm, *args)) if d)


def find(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    """The one manifest of ``kind`` (named ``name``, if given)."""
    hits = [
        m
        for m in manifests
        if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"{len(hits)} {kind} named {name}: {[m['metadata'] for m in hits]}"
    return hits[0]


def component(role: str) -> str:
    """Name of a service's objects in the test release."""
    return f"{RELEASE}-alignd-{role}"


def workload(manifests: list[Manifest], role: str) -> Manifest:
    """The Deployment (or, for the trainer, StatefulSet) of ``role``."""
    kind = "StatefulSet" if role == "trainer" else "Deployment"
    return find(manifests, kind, component(role))


def container(manifests: list[Manifest], role: str) -> Manifest:
    """The service container of ``role``'s pod."""
    (main,) = workload(manifests, role)["spec"]["template"]["spec"]["containers"]
    return main


def config_env(manifests: list[Manifest], role: str) -> dict[str, str]:
    """The ALIGND_* variables of ``role`` (its ConfigMap's data)."""
    return find(manifests, "ConfigMap", component(role))["data"]
