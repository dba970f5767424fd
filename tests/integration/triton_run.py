"""Runs in the tritonclient environment (``make tools`` builds ``.venv-triton``): tritonclient's
gRPC client against a reward service's Open Inference Protocol endpoint.

    python triton_run.py HOST:PORT MODEL TOKEN_OR_- < items.json

``items.json`` is ``{"prompts": [...], "responses": [...], "labels": [...] | null}``; prints
one JSON object: liveness, readiness, server and model metadata, and the scores of ModelInfer
(inputs sent as numpy BYTES tensors, which tritonclient sends raw).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton


def main() -> int:
    target, model, token = sys.argv[1:4]
    items = json.load(sys.stdin)
    headers = None if token == "-" else {"authorization": f"Bearer {token}"}
    client = triton.InferenceServerClient(target)
    metadata = client.get_model_metadata(model, headers=headers, as_json=True)
    inputs = []
    for name in ("prompt", "response", "label"):
        values = items.get(f"{name}s")
        if values is None:
            continue
        tensor = triton.InferInput(name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_))
        inputs.append(tensor)
    result = client.infer(model, inputs, outputs=[triton.InferRequestedOutput("score")],
                          headers=headers, request_id="triton-1")  # fmt: skip
    out = {
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(model, headers=headers),
        "server": client.get_server_metadata(headers=headers, as_json=True),
        "model": metadata,
        "id": result.get_response().id,
        "scores": result.as_numpy("score").astype(float).tolist(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
