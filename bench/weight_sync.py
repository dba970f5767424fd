"""Weight sync: seconds to push a model's full weights through UpdateWeights, and the effective
GB/s against a local memory copy of the same bytes.

    python bench/weight_sync.py                     # SmolLM2-135M (prepared bundled model)
    python bench/weight_sync.py --device cuda       # the receiving service on the GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_device_argument, report

from alignd import GenerationClient
from alignd.local import LocalService
from alignd.models import resolve_model
from alignd_server.common.models import load_causal_lm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or directory")
    parser.add_argument("--repeats", type=int, default=3)
    add_device_argument(parser)
    parser.add_argument("--out", type=Path, default=None, help="append results as JSON lines")
    args = parser.parse_args()
    path = resolve_model(args.model)
    loaded = load_causal_lm(path)
    tensors = {n: p.detach().numpy() for n, p in loaded.model.named_parameters()}
    size = sum(t.nbytes for t in tensors.values())
    targets = {n: np.empty_like(t) for n, t in tensors.items()}

    copies = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for name, tensor in tensors.items():
            np.copyto(targets[name], tensor)
        copies.append(time.perf_counter() - start)

    flags = ["--model", str(path), "--metrics-port", "-1", "--log-level", "WARNING",
             "--device", args.device]  # fmt: skip
    pushes = []
    with LocalService("generation", flags) as service, GenerationClient(service.target) as client:
        for version in range(1, args.repeats + 1):
            start = time.perf_counter()
            response = client.update_weights(tensors, version=version, timeout=600)
            pushes.append(time.perf_counter() - start)
            assert response.version == version
    push, copy = min(pushes), min(copies)
    rows = [
        (f"bytes pushed ({len(tensors)} tensors)", size / 1e6, "MB"),
        ("UpdateWeights, client call to swap done", push, "s"),
        ("UpdateWeights effective rate", size / push / 1e9, "GB/s"),
        ("local memory copy of the same bytes", size / copy / 1e9, "GB/s"),
    ]
    report(f"weight sync ({path.name})", rows, {"push GB/s / memcpy GB/s": copy / push}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
