"""Generation throughput: the service vs the same engine in-process, same model and prompts.

The peer is the engine in-process — transformers ``model.generate`` for ``--engine hf``,
``vllm.LLM.generate`` for ``--engine vllm`` — greedy, exactly 64 new tokens; the service runs
the same engine behind gRPC with the same prompts as token ids and ``ignore_eos``. With
``--engine vllm`` the hf in-process peer runs too, for the vllm-service / hf ratio. Batches of
8 and 32; the runs take turns, best of each; prints generated tokens/s and the ratios
(target >= 0.95 against the same engine).

    python bench/generation_throughput.py               # hf, SmolLM2-135M (prepared model)
    .venv-vllm/bin/python bench/generation_throughput.py --engine vllm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, report, sentences

from alignd import GenerationClient, SamplingParams
from alignd.local import LocalService
from alignd.models import resolve_model
from alignd_server.common.models import load_causal_lm

NEW_TOKENS = 64


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


def in_process(loaded, prompts: list[list[int]]):
    """``model.generate``, greedy, exactly NEW_TOKENS tokens, one left-padded batch."""
    pad = loaded.tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run() -> None:
        with torch.inference_mode():
            loaded.model.generate(
                ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False, pad_token_id=pad,
            )  # fmt: skip

    return run


def vllm_in_process(path: Path, prompts: list[list[int]]):
    """``vllm.LLM.generate`` in this process, greedy, exactly NEW_TOKENS tokens."""
    from alignd_server.generation.config import vllm_environment

    vllm_environment()
    import vllm

    llm = vllm.LLM(model=str(path), dtype="float32", max_model_len=2048, enforce_eager=True)
    # The same work as the service: it returns the sampled tokens' log-probs too.
    params = vllm.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    return lambda: llm.generate(inputs, params, use_tqdm=False)


def served(client: GenerationClient, prompts: list[list[int]]):
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    return lambda: client.generate(prompts, params)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or directory")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--out", type=Path, default=None, help="append results as JSON lines")
    args = parser.parse_args()
    path = resolve_model(args.model)
    loaded = load_causal_lm(path)
    flags = ["--model", str(path), "--metrics-port", "-1", "--log-level", "WARNING",
             "--engine", args.engine]  # fmt: skip
    rows, ratios = [], {}
    with LocalService("generation", flags) as service, GenerationClient(service.target) as client:
        for batch in args.batches:
            prompts = prompts_for(loaded.tokenizer, batch)
            runs = {"hf": in_process(loaded, prompts), "service": served(client, prompts)}
            if args.engine == "vllm":
                runs["vllm"] = vllm_in_process(path, prompts)
            best = interleaved(args.repeats, runs)
            tokens = batch * NEW_TOKENS
            peer = best[args.engine]
            rows.append((f"in-process model.generate, batch {batch}", tokens / best["hf"], "tok/s"))
            if args.engine == "vllm":
                rows.append(
                    (f"in-process vllm.LLM.generate, batch {batch}", tokens / peer, "tok/s")
                )
            rows.append(
                (
                    f"service ({args.engine} engine), batch {batch}",
                    tokens / best["service"],
                    "tok/s",
                )
            )
            ratios[f"service / in-process {args.engine}, batch {batch} (target >= 0.95)"] = (
                peer / best["service"]
            )
            if args.engine == "vllm":
                ratios[f"vllm service / hf in-process, batch {batch}"] = (
                    best["hf"] / best["service"]
                )
    report(f"generation throughput ({path.name}, {NEW_TOKENS} new tokens)", rows, ratios, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
