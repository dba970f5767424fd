"""Reference log-prob throughput: the service vs an in-process forward, same model and data.

The peer runs the model in-process on right-padded batches and takes log_softmax of the logits
at the completion tokens (what a trainer computing reference log-probs itself does); the
service gets the same sequences through ``ReferenceClient.logprobs``. The runs take turns,
several rounds, best of each; it prints completion tokens/s and the ratio (target >= 0.9).

    python bench/reference_throughput.py              # SmolLM2-135M (prepared bundled model)
    python bench/reference_throughput.py --sequences 32 --model PATH
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_device_argument, interleaved, report, synchronize

from alignd import ReferenceClient
from alignd.local import LocalService
from alignd.models import resolve_model
from alignd_server.common.forward import pad_right
from alignd_server.common.models import load_causal_lm

BATCH = 8


def data(vocab: int, count: int, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """Sequences of 96..256 tokens with prompts of 16..64 tokens (ids from the real vocab)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(96, 257, size=count)
    prompts = rng.integers(16, 65, size=count)
    rows = [rng.integers(3, vocab, size=n).astype(np.int32) for n in lengths]
    return rows, prompts.tolist()


def in_process(path: Path, rows: list[np.ndarray], prompts: list[int], device: str):
    """The peer: full-logits forward, log_softmax, gather, batches of BATCH in order."""
    loaded = load_causal_lm(path, device=device)
    pad = loaded.tokenizer.pad_token_id

    def run() -> None:
        for i in range(0, len(rows), BATCH):
            ids, mask, lengths = pad_right(rows[i : i + BATCH], pad, device)
            with torch.inference_mode():
                logprobs = torch.log_softmax(loaded.model(ids, attention_mask=mask).logits, -1)
                for b, p in enumerate(prompts[i : i + BATCH]):
                    n = int(lengths[b])
                    logprobs[b, p - 1 : n - 1].gather(-1, ids[b, p:n, None])
        synchronize(device)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or directory")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    add_device_argument(parser)
    parser.add_argument("--out", type=Path, default=None, help="append results as JSON lines")
    args = parser.parse_args()
    path = resolve_model(args.model)
    flags = ["--model", str(path), "--metrics-port", "-1", "--max-batch-size", str(BATCH),
             "--log-level", "WARNING", "--device", args.device]  # fmt: skip
    with LocalService("reference", flags) as service, ReferenceClient(service.target) as client:
        rows, prompts = data(client.info().server.model.vocab_size, args.sequences)
        best = interleaved(
            args.repeats,
            {
                "peer": in_process(path, rows, prompts, args.device),
                "service": lambda: client.logprobs(rows, prompts),
            },
        )
    tokens = sum(len(r) - p for r, p in zip(rows, prompts, strict=True))
    rows_out = [
        (f"in-process forward + log_softmax, batches of {BATCH}", tokens / best["peer"], "tok/s"),
        ("service ComputeLogprobs", tokens / best["service"], "tok/s"),
    ]
    ratios = {"service / in-process (target >= 0.9)": best["peer"] / best["service"]}
    report(f"reference throughput ({path.name}, {len(rows)} sequences)", rows_out, ratios, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
