"""Weight sync: seconds for the trainer's PushWeights to install a model's full weights on a
generation replica, by transport — the UpdateWeights stream, a shared path, and the collective
transport (a torch.distributed group) — taking turns, with the effective GB/s of each against
a local memory copy of the same bytes.

Both services run on this machine on loopback (the trainer on the CPU; the replica on
``--device``), with a storage root they share for the shared-path transport. A push is timed
from the client: the trainer gathering its weights, the transfer, the replica's checks and
swap. The best of ``--repeats`` turns is reported.

    python bench/weight_sync.py                     # SmolLM2-135M (prepared bundled model)
    python bench/weight_sync.py --device cuda       # the receiving service on the GPU
    python bench/weight_sync.py --bucket-mib 64     # the collective transport's bucket size
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_device_argument, interleaved, report

from alignd import TrainerClient
from alignd.local import LocalService
from alignd.models import resolve_model
from alignd_server.common.models import load_causal_lm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or directory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mib", type=int, default=256,
                        help="bucket size of the collective transport, MiB (1 .. 512)")  # fmt: skip
    add_device_argument(parser)
    parser.add_argument("--out", type=Path, default=None, help="append results as JSON lines")
    args = parser.parse_args()
    path = resolve_model(args.model)
    tensors = {n: p.detach().numpy() for n, p in load_causal_lm(path).model.named_parameters()}
    size = sum(t.nbytes for t in tensors.values())
    targets = {n: np.empty_like(t) for n, t in tensors.items()}

    def copy() -> None:
        for name, tensor in tensors.items():
            np.copyto(targets[name], tensor)

    with tempfile.TemporaryDirectory() as root:
        common = ["--model", str(path), "--metrics-port", "-1", "--log-level", "WARNING",
                  "--storage-root", root, "--storage-root", str(path.parent)]  # fmt: skip
        with LocalService("generation", [*common, "--device", args.device]) as generation:
            trainer_flags = [*common, "--push-targets", generation.target]
            with LocalService("trainer", trainer_flags) as trainer_service:
                with TrainerClient(trainer_service.target, timeout=3600) as trainer:
                    trainer.initialize(str(path), "causal_lm")
                    version = iter(range(1, 1 << 30))
                    pushed = {}

                    def push(name: str, **transport):
                        def run() -> None:
                            (result,) = trainer.push_weights(
                                [generation.target], next(version), timeout_seconds=600,
                                **transport,
                            )  # fmt: skip
                            if not result.ok:
                                raise RuntimeError(f"{name} push failed: {result.error}")
                            pushed[name] = result.bytes

                        return run

                    best = interleaved(args.repeats, {
                        "stream": push("stream"),
                        "shared_path": push("shared_path", shared_path=str(Path(root) / "w")),
                        "collective": push("collective", rendezvous="127.0.0.1:0",
                                           bucket_bytes=args.bucket_mib << 20),
                        "memcpy": copy,
                    })  # fmt: skip
    rows = [(f"bytes of the policy ({len(tensors)} tensors)", size / 1e6, "MB")]
    for name in ("stream", "shared_path", "collective"):
        rows += [
            (f"PushWeights, {name}: client call to swap done", best[name], "s"),
            (f"PushWeights, {name}: effective rate", pushed[name] / best[name] / 1e9, "GB/s"),
        ]
    rows.append(("local memory copy of the same bytes", size / best["memcpy"] / 1e9, "GB/s"))
    ratios = {
        "collective / stream, s (lower is faster)": best["collective"] / best["stream"],
        "collective / shared_path, s": best["collective"] / best["shared_path"],
    }
    report(f"weight sync ({path.name}, bucket {args.bucket_mib} MiB)", rows, ratios, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
