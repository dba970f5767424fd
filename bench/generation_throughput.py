"""Generation as a serving engine: many callers, rollout-like batches, time to first token.

One run, same model and prompts, runs taking turns (best of ``--repeats``):

(a) callers: 64 concurrent callers with one prompt each vs one caller with the 64 prompts,
    greedy, exactly 64 new tokens; generated tokens/s and the ratio (target >= 0.9: callers
    share the engine's running batch).
(b) rollout mix: the 64 prompts in one request, max_new_tokens 64, greedy, with a stop token
    chosen (from a calibration run) so that about half the rows stop early; the peer is the
    same engine in-process on the same batch — ``model.generate`` (which decodes finished
    rows until the longest ends) for hf, ``vllm.LLM.generate`` for vllm (target >= 0.95).
    Tokens/s count the tokens returned (up to and including the stop token).
(c) time to first token, p50 and p99, of 64 concurrent streaming callers.

    python bench/generation_throughput.py                  # hf, SmolLM2-135M (prepared model)
    .venv-vllm/bin/python bench/generation_throughput.py --engine vllm
    python3 bench/generation_throughput.py --device cuda   # on a GPU machine
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, report, sentences

from alignd import AsyncGenerationClient, GenerationClient, SamplingParams
from alignd.local import LocalService
from alignd.models import resolve_model
from alignd_server.common.models import load_causal_lm

NEW_TOKENS = 64
CALLERS = 64
TIMEOUT_S = 1800.0  # per call: a slow or shared machine must not cut a run short


def prompts_for(tokenizer, count: int) -> list[list[int]]:
    """Chat prompts of varied length, tokenized with the model's template."""
    chats = [[{"role": "user", "content": text}] for text in sentences(count, 6, 30, seed=3)]
    return [
        tokenizer.encode(
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        for c in chats
    ]


def half_stop_token(outputs: list[list[int]]) -> int:
    """The token whose first appearance ends about half of ``outputs`` early (before their
    last position), from a greedy calibration run."""
    rows_with = collections.Counter(t for out in outputs for t in set(out[:-1]))
    return min(rows_with, key=lambda t: (abs(rows_with[t] - len(outputs) / 2), t))


def returned_tokens(outputs: list[list[int]], stops: set[int]) -> int:
    """Tokens of greedy ``outputs`` up to and including the first stop token of each."""
    total = 0
    for out in outputs:
        cut = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
        total += cut
    return total


# -- contenders ---------------------------------------------------------------------------


def hf_in_process(loaded, prompts: list[list[int]], stops: list[int] | None):
    """``model.generate``: one left-padded batch, greedy; ``stops`` end rows (generate keeps
    decoding them, padded, until every row ended), else exactly NEW_TOKENS tokens."""
    pad = loaded.tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    device = loaded.device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    extra = {"eos_token_id": stops} if stops else {"min_new_tokens": NEW_TOKENS}

    def run() -> None:
        with torch.inference_mode():
            loaded.model.generate(
                ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                pad_token_id=pad, **extra,
            )  # fmt: skip

    return run


def vllm_in_process(path: Path, prompts: list[list[int]], stops: list[int] | None):
    """``vllm.LLM.generate`` in this process on the same batch (log-probs too, as served)."""
    from alignd_server.generation.config import vllm_environment

    vllm_environment()
    import vllm

    llm = vllm_in_process.llm = getattr(vllm_in_process, "llm", None) or vllm.LLM(
        model=str(path), dtype="float32", max_model_len=2048, enforce_eager=True
    )
    params = vllm.SamplingParams(
        temperature=0, max_tokens=NEW_TOKENS, logprobs=0, ignore_eos=not stops,
        stop_token_ids=list(stops or []),
    )  # fmt: skip
    inputs = [{"prompt_token_ids": p} for p in prompts]
    return lambda: llm.generate(inputs, params, use_tqdm=False)


def one_caller(client: GenerationClient, prompts, params: SamplingParams):
    return lambda: client.generate(prompts, params)


def many_callers(target: str, prompts, params: SamplingParams):
    """Every prompt from its own concurrent caller (one asyncio client, one call each)."""

    async def calls() -> None:
        async with AsyncGenerationClient(target, timeout=TIMEOUT_S) as client:
            await asyncio.gather(*(client.generate([p], params) for p in prompts))

    return lambda: asyncio.run(calls())


def first_token_times(target: str, prompts, params: SamplingParams) -> list[float]:
    """Seconds from sending to the first streamed message, per concurrent streaming caller."""

    async def caller(client, prompt) -> float:
        start = time.perf_counter()
        stream = client.stream(prompt, params)
        await anext(stream)
        first = time.perf_counter() - start
        async for _ in stream:
            pass
        return first

    async def calls() -> list[float]:
        async with AsyncGenerationClient(target, timeout=TIMEOUT_S) as client:
            return await asyncio.gather(*(caller(client, p) for p in prompts))

    return asyncio.run(calls())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or directory")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--device", default="cpu", help="torch device (hf service and peer)")
    parser.add_argument("--out", type=Path, default=None, help="append results as JSON lines")
    args = parser.parse_args()
    path = resolve_model(args.model)
    loaded = load_causal_lm(path, device=args.device)
    flags = ["--model", str(path), "--metrics-port", "-1", "--log-level", "WARNING",
             "--engine", args.engine, "--device", args.device]  # fmt: skip
    prompts = prompts_for(loaded.tokenizer, CALLERS)
    exact = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    rows, ratios = [], {}
    with (
        LocalService("generation", flags) as service,
        GenerationClient(service.target, timeout=TIMEOUT_S) as client,
    ):
        # (a) many callers vs one
        best = interleaved(args.repeats, {
            "one caller": one_caller(client, prompts, exact),
            "many callers": many_callers(service.target, prompts, exact),
        })  # fmt: skip
        tokens = CALLERS * NEW_TOKENS
        rows.append((f"1 caller x {CALLERS} prompts", tokens / best["one caller"], "tok/s"))
        rows.append((f"{CALLERS} callers x 1 prompt", tokens / best["many callers"], "tok/s"))
        ratios[f"{CALLERS} callers / 1 caller (target >= 0.9)"] = (
            best["one caller"] / best["many callers"]
        )

        # (b) rollout mix: about half the rows stop early
        calibration = [c[0].token_ids.tolist() for c in client.generate(prompts, exact)]
        stop = half_stop_token(calibration)
        stopping = sum(stop in out[:-1] for out in calibration)
        mix = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, stop_token_ids=[stop])
        served = client.generate(prompts, mix)
        useful = sum(len(c[0].token_ids) for c in served)
        eos = sorted(_eos_ids(loaded))
        runs = {"service": one_caller(client, prompts, mix)}
        if args.engine == "hf":
            runs["peer"] = hf_in_process(loaded, prompts, [stop, *eos])
            peer = "in-process model.generate (decodes finished rows)"
        else:
            runs["peer"] = vllm_in_process(path, prompts, [stop])
            peer = "in-process vllm.LLM.generate"
        best = interleaved(args.repeats, runs)
        label = f"rollout mix, {stopping}/{CALLERS} rows stop early"
        rows.append((f"{label}: {peer}", useful / best["peer"], "tok/s"))
        rows.append((f"{label}: service ({args.engine})", useful / best["service"], "tok/s"))
        target = " (target >= 0.95)" if args.engine == "vllm" else ""
        ratios[f"rollout mix service / {peer.split(' (')[0]}{target}"] = (
            best["peer"] / best["service"]
        )

        # (c) time to first token under 64 streaming callers
        first_token_times(service.target, prompts[:8], exact)  # warm-up
        times = [
            t
            for _ in range(args.repeats)
            for t in first_token_times(service.target, prompts, exact)
        ]
        rows.append((f"time to first token, {CALLERS} callers, p50", percentile(times, 0.5), "s"))
        rows.append((f"time to first token, {CALLERS} callers, p99", percentile(times, 0.99), "s"))
        rows.append(("time to first token, mean", statistics.fmean(times), "s"))
    title = f"generation serving ({path.name}, {args.engine} engine, {args.device})"
    report(title, rows, ratios, args.out)
    return 0


def _eos_ids(loaded) -> set[int]:
    from alignd_server.common.info import eos_token_ids

    return set(eos_token_ids(loaded))


if __name__ == "__main__":
    sys.exit(main())
