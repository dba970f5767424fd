"""Writes servicemonitor.schema.json from the Prometheus Operator's ServiceMonitor CRD.

The CRD's ``openAPIV3Schema`` becomes a strict JSON schema: descriptions and Kubernetes
extensions dropped, ``additionalProperties: false`` on every object that lists its
properties (as the API server prunes and ``kubectl --validate=strict`` rejects unknown
fields), ``x-kubernetes-int-or-string`` as integer-or-string. Run it by hand when moving to a
newer operator release::

    python tests/deploy/make_servicemonitor_schema.py monitoring.coreos.com_servicemonitors.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).with_name("servicemonitor.schema.json")
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": STRINGS,
        "annotations": STRINGS,
    },
}
"""The part of ObjectMeta a chart sets (the CRD leaves metadata to the API server)."""


def strict(node: Any) -> Any:
    """The JSON-schema form of one openAPIV3Schema node (recursively)."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("description", "default", "format") or key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: strict(schema) for name, schema in value.items()}
        else:
            out[key] = strict(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["type"] = ["integer", "string"]
    if "properties" in node and "additionalProperties" not in node:
        preserve = node.get("x-kubernetes-preserve-unknown-fields")
        out["additionalProperties"] = bool(preserve)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="monitoring.coreos.com_servicemonitors.yaml")
    crd = next(d for d in yaml.safe_load_all(parser.parse_args().crd.read_text()) if d)
    version = crd["metadata"]["annotations"]["operator.prometheus.io/version"]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": "monitoring.coreos.com/v1"}
    schema["properties"]["kind"] = {"const": "ServiceMonitor"}
    schema["properties"]["metadata"] = METADATA
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    document = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": f"ServiceMonitor v1 from the Prometheus Operator {version} CRD; "
        "regenerate with make_servicemonitor_schema.py",
        **schema,
    }
    OUT.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
