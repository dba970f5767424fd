"""Reward scoring throughput: the service vs an in-process transformers forward, same model.

Measures, on the same (prompt, response) pairs:
  1. in-process: tokenizer + model forward in batches of 32 (the peer);
  2. the service, one client sending batches of 32;
  3. the service, 64 concurrent clients sending single items (dynamic batching on);
  4. the same with dynamic batching off (max batch size 1);
  5. the service's Open Inference Protocol endpoint (ModelInfer, raw BYTES inputs as
     tritonclient sends them), one client sending batches of 32;
  6. an ensemble of two copies of the model (``--scorers ens=ensemble:a,b``) and each member
     alone, one client sending batches of 32.
The runs take turns, several rounds, best of each; it prints pairs/s and the ratios 2/1
(target >= 0.9), 3/1 (target >= 0.8), with 4/1 beside, 5/2 (target >= 0.95) and the ensemble
over its slower member (target >= 0.9). The services read items in the ``alignd`` format, the
layout the in-process peer builds.

    python bench/reward_throughput.py                 # MiniLM (prepared bundled model)
    python bench/reward_throughput.py --pairs 256 --model PATH
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
from common import add_device_argument, interleaved, report, sentences, synchronize

from alignd import AsyncRewardClient, RewardClient
from alignd.local import LocalService
from alignd.models import resolve_model
from alignd.v1 import open_inference_pb2 as oip
from alignd.v1 import open_inference_pb2_grpc as oip_grpc
from alignd_server.common.forward import pad_right, sequence_scores
from alignd_server.common.models import load_sequence_classifier
from alignd_server.common.tokenization import tokenize

BATCH = 32
CONCURRENCY = 64


def in_process(path: Path, prompts: list[str], responses: list[str], device: str):
    """Scores all pairs in-process: the tokenizer and the forward, batches of 32."""
    loaded = load_sequence_classifier(path, device=device)
    pad = loaded.tokenizer.pad_token_id

    def run() -> None:
        for i in range(0, len(prompts), BATCH):
            rows = [
                tokenize(loaded.tokenizer, p, r, max_length=512).input_ids
                for p, r in zip(prompts[i : i + BATCH], responses[i : i + BATCH], strict=True)
            ]
            with torch.inference_mode():
                sequence_scores(loaded.model, *pad_right(rows, pad, device))
        synchronize(device)

    return run


def served_batches(client: RewardClient, prompts: list[str], responses: list[str]):
    def run() -> None:
        for i in range(0, len(prompts), BATCH):
            client.score(prompts[i : i + BATCH], responses[i : i + BATCH])

    return run


def served_oip(stub, prompts: list[str], responses: list[str]):
    """ModelInfer in batches of 32, inputs as raw BYTES tensors (tritonclient's form)."""

    def raw(values: list[str]) -> bytes:
        return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)

    tensor = oip.ModelInferRequest.InferInputTensor

    def run() -> None:
        for i in range(0, len(prompts), BATCH):
            part = prompts[i : i + BATCH], responses[i : i + BATCH]
            stub.ModelInfer(oip.ModelInferRequest(
                model_name="default", raw_input_contents=[raw(part[0]), raw(part[1])],
                inputs=[tensor(name=n, datatype="BYTES", shape=[len(part[0])])
                        for n in ("prompt", "response")],
            ), timeout=600)  # fmt: skip

    return run


def served_scorer(client: RewardClient, scorer: str, prompts: list[str], responses: list[str]):
    def run() -> None:
        for i in range(0, len(prompts), BATCH):
            client.score(prompts[i : i + BATCH], responses[i : i + BATCH], scorer=scorer)

    return run


def served_concurrent(target: str, prompts: list[str], responses: list[str]):
    """64 asyncio clients (one channel each), each sending its share of items one by one."""

    async def main() -> None:
        clients = [AsyncRewardClient(target) for _ in range(CONCURRENCY)]

        async def worker(client: AsyncRewardClient, k: int) -> None:
            for i in range(k, len(prompts), CONCURRENCY):
                await client.score([prompts[i]], [responses[i]])

        await asyncio.gather(*(worker(c, k) for k, c in enumerate(clients)))
        await asyncio.gather(*(c.close() for c in clients))

    return lambda: asyncio.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6", help="bundled name or directory")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    add_device_argument(parser)
    parser.add_argument("--out", type=Path, default=None, help="append results as JSON lines")
    args = parser.parse_args()
    path = resolve_model(args.model)
    prompts = sentences(args.pairs, 8, 40, seed=1)
    responses = sentences(args.pairs, 10, 60, seed=2)
    n = len(prompts)

    flags = ["--model", str(path), "--model-format", "alignd", "--metrics-port", "-1",
             "--max-queue-size", "4096", "--log-level", "WARNING",
             "--device", args.device]  # fmt: skip
    unbatched_flags = [*flags, "--max-batch-size", "1", "--max-wait-ms", "0"]
    member = f"model:{path}:alignd"
    ensemble_flags = [*flags, "--scorers", f"a={member}", "--scorers", f"b={member}",
                      "--scorers", "ens=ensemble:a,b"]  # fmt: skip
    with (
        LocalService("reward", flags) as service,
        LocalService("reward", unbatched_flags) as plain,
        LocalService("reward", ensemble_flags) as ensemble,
        RewardClient(service.target) as client,
        RewardClient(ensemble.target) as members,
        grpc.insecure_channel(service.target) as channel,
    ):
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        best = interleaved(
            args.repeats,
            {
                "peer": in_process(path, prompts, responses, args.device),
                "batched": served_batches(client, prompts, responses),
                "concurrent": served_concurrent(service.target, prompts, responses),
                "unbatched": served_concurrent(plain.target, prompts, responses),
                "oip": served_oip(stub, prompts, responses),
                "member a": served_scorer(members, "a", prompts, responses),
                "member b": served_scorer(members, "b", prompts, responses),
                "ensemble": served_scorer(members, "ens", prompts, responses),
            },
        )
    peer = best["peer"]
    slower = max(best["member a"], best["member b"])
    rows = [
        (f"in-process forward, batches of {BATCH}", n / peer, "pairs/s"),
        (f"service, 1 client, batches of {BATCH}", n / best["batched"], "pairs/s"),
        (f"service, {CONCURRENCY} clients x 1 item, dynamic batching", n / best["concurrent"],
         "pairs/s"),
        (f"service, {CONCURRENCY} clients x 1 item, batching off", n / best["unbatched"],
         "pairs/s"),
        (f"service, Open Inference Protocol ModelInfer, batches of {BATCH}", n / best["oip"],
         "pairs/s"),
        ("ensemble member alone (slower of the two)", n / slower, "pairs/s"),
        ("ensemble of the two members", n / best["ensemble"], "pairs/s"),
    ]  # fmt: skip
    ratios = {
        "batched service / in-process (target >= 0.9)": peer / best["batched"],
        "64 clients, dynamic batching / in-process (target >= 0.8)": peer / best["concurrent"],
        "64 clients, batching off / in-process": peer / best["unbatched"],
        "ModelInfer / Score, pairs/s (target >= 0.95)": best["batched"] / best["oip"],
        "ensemble / slower member, pairs/s (target >= 0.9)": slower / best["ensemble"],
    }
    report(f"reward throughput ({path.name}, {n} pairs)", rows, ratios, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
