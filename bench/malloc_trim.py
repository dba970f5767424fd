"""What handing freed memory back to the OS costs: reward scoring with and without it.

Three reward services on the same model score the same pairs in batches of 32, taking turns
(best of several rounds): glibc's defaults with no trimming (``--malloc-trim-interval-s 0``),
the server's periodic ``malloc_trim`` at an aggressive 1 s (the default is 60 s), and glibc's
mmap threshold lowered to 32 KiB (``MALLOC_MMAP_THRESHOLD_``, the other way to make RSS follow
what is freed). It prints pairs/s and each one's throughput relative to the untrimmed service.
Whether RSS returns is checked by ``tests/integration/test_connection_limits.py``.

    python bench/malloc_trim.py                 # MiniLM (prepared bundled model)
    python bench/malloc_trim.py --pairs 256 --model PATH
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, report, sentences

from alignd import RewardClient
from alignd.local import LocalService
from alignd.models import resolve_model

BATCH = 32
VARIANTS = {
    "no trimming": (["--malloc-trim-interval-s", "0"], {}),
    "malloc_trim every 1 s": (["--malloc-trim-interval-s", "1"], {}),
    "mmap threshold 32 KiB": (["--malloc-trim-interval-s", "0"],
                              {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024)}),
}  # fmt: skip


def scoring(client: RewardClient, prompts: list[str], responses: list[str]):
    def run() -> None:
        for i in range(0, len(prompts), BATCH):
            client.score(prompts[i : i + BATCH], responses[i : i + BATCH])

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6", help="bundled name or directory")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="append results as JSON lines")
    args = parser.parse_args()
    path = resolve_model(args.model)
    prompts = sentences(args.pairs, 8, 40, seed=1)
    responses = sentences(args.pairs, 10, 60, seed=2)
    flags = ["--model", str(path), "--metrics-port", "-1", "--log-level", "WARNING"]
    services = {
        name: LocalService("reward", [*flags, *extra], env=env)
        for name, (extra, env) in VARIANTS.items()
    }
    clients = {}
    try:
        for name, service in services.items():
            service.start()
            clients[name] = RewardClient(service.target)
        best = interleaved(
            args.repeats, {n: scoring(c, prompts, responses) for n, c in clients.items()}
        )
    finally:
        for client in clients.values():
            client.close()
        for service in services.values():
            service.stop()
    base = best["no trimming"]
    rows = [(name, len(prompts) / seconds, "pairs/s") for name, seconds in best.items()]
    ratios = {f"{n} / no trimming": base / best[n] for n in VARIANTS if n != "no trimming"}
    report(f"memory release cost ({path.name}, {len(prompts)} pairs)", rows, ratios, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
