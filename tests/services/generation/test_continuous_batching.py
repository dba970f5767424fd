"""The generation service as a serving engine (either engine, ``--engine``): requests from many
callers share the running batch, streams deliver tokens as they are produced, cancelled and
expired requests leave the engine, and weight swaps under load keep the version contract."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from service_metrics import scrape

from alignd import AsyncGenerationClient, GenerationClient, SamplingParams
from alignd.clients.tokenize import prompt_to_proto
from alignd.errors import DeadlineExceededError, ResourceExhaustedError
from alignd.v1 import generation_pb2
from alignd_server.common.models import load_causal_lm
from alignd_server.generation.engine import EngineLoad

PROMPTS = [f"Tell me about river number {i} and the town beside it." for i in range(16)]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)
# Long enough that a request sent once it runs is served well before it ends: 16 rows x 480
# steps against a 4-step request.
LONG = SamplingParams(max_new_tokens=480, temperature=1.0, n=16, seed=1, ignore_eos=True)
SHORT = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture
def server(serve, engine):
    return serve("generation", engine=engine, max_request_tokens=200_000)


def servicer(server):
    return server.server.services[0]


def on_loop(server, coroutine):
    """Runs ``coroutine`` on the server's event loop; returns its concurrent future."""
    return asyncio.run_coroutine_threadsafe(coroutine, server._loop)


def wait_until(condition, timeout: float = 60.0) -> None:
    """Waits (bounded) for ``condition()`` to hold."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def metric(server, name: str, **labels: str) -> float:
    return scrape(server).get((name, frozenset(labels.items())), 0.0)


def aborted(server, reason: str) -> float:
    return metric(server, "alignd_generation_aborted_requests_total", reason=reason)


def occupancy(server) -> tuple[float, float]:
    """(steps, row-steps) the engine has decoded so far."""
    return (
        metric(server, "alignd_generation_batch_occupancy_count"),
        metric(server, "alignd_generation_batch_occupancy_sum"),
    )


def running_stream(client):
    """A cancellable GenerateStream call of the LONG request, once its first token is out."""
    request = generation_pb2.GenerateStreamRequest(
        prompt=prompt_to_proto(PROMPTS[0]), params=LONG.to_proto()
    )
    stream = client._stub.GenerateStream(request, timeout=120)
    next(stream)
    return stream


def tokens(completion) -> list[int]:
    return completion.token_ids.tolist()


async def held_gate(server, until) -> None:
    """Holds the engine (as a weight swap does) until ``until(servicer)`` holds: requests
    accepted meanwhile wait, then enter it together."""
    service = servicer(server)
    async with service.gate.exclusive(swap=False):
        while not until(service):
            await asyncio.sleep(0.005)


def queued(count: int):
    return lambda service: service._queued_requests >= count


def test_concurrent_callers_get_exactly_what_they_get_alone(server):
    with GenerationClient(server.target) as client:
        together = [group[0] for group in client.generate(PROMPTS, GREEDY)]
        sequential = [client.generate([p], GREEDY)[0][0] for p in PROMPTS]
    steps, rows = occupancy(server)

    async def concurrent():
        async with AsyncGenerationClient(server.target) as client:
            hold = asyncio.wrap_future(on_loop(server, held_gate(server, queued(len(PROMPTS)))))
            calls = [client.generate([p], GREEDY) for p in PROMPTS]
            results = await asyncio.gather(*calls)
            await hold
            return [r[0][0] for r in results]

    parallel = asyncio.run(concurrent())
    more_steps, more_rows = occupancy(server)
    for a, b, c in zip(together, sequential, parallel, strict=True):
        assert tokens(a) == tokens(b) == tokens(c)
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)
        np.testing.assert_allclose(c.logprobs, a.logprobs, atol=1e-4)
    # The 16 callers were decoded together: far fewer steps than 16 requests alone take.
    assert more_rows - rows == pytest.approx(sum(len(tokens(c)) for c in parallel), abs=16)
    assert more_steps - steps < (more_rows - rows) / 4


def test_a_request_sent_while_a_long_one_runs_is_served_before_it_ends(server):
    engine = servicer(server).engine
    started, done = threading.Event(), threading.Event()
    streamed: list[int] = []

    def long_stream():
        with GenerationClient(server.target) as client:
            for message in client.stream(PROMPTS[0], LONG):
                started.set()
                streamed.append(len(message.token_ids.data) // 4)
        done.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    try:
        assert started.wait(60)
        with GenerationClient(server.target) as client:
            (short,) = client.generate([PROMPTS[1]], SHORT)[0]
        # Served while the long request is still being decoded (the engine holds it).
        still_running = engine.load().running_requests
    finally:
        thread.join(120)
    assert still_running == 1
    assert done.is_set() and sum(streamed) == 16 * LONG.max_new_tokens
    assert len(tokens(short)) == 4


def test_streamed_tokens_arrive_while_the_request_runs_and_equal_generate(server):
    params = SamplingParams(max_new_tokens=480, temperature=0, ignore_eos=True)
    engine = servicer(server).engine
    with GenerationClient(server.target) as client:
        (expected,) = client.generate([PROMPTS[2]], params)[0]
        stream = client.stream(PROMPTS[2], params)
        first = next(stream)
        running = engine.load().running_requests  # the request is still being decoded
        messages = [first, *stream]
    assert running == 1
    streamed = [int(t) for m in messages for t in np.frombuffer(m.token_ids.data, "<i4")]
    assert streamed == tokens(expected)
    logprobs = [float(v) for m in messages for v in np.frombuffer(m.logprobs.data, "<f4")]
    np.testing.assert_allclose(logprobs, expected.logprobs, atol=1e-4)


def test_a_cancelled_request_leaves_the_engine_and_later_ones_run_alone(server):
    engine = servicer(server).engine
    with GenerationClient(server.target) as client:
        stream = running_stream(client)
        stream.cancel()
        wait_until(lambda: engine.load() == EngineLoad(0, 0, 0, 0))
        wait_until(lambda: aborted(server, "cancelled") == 1)
        steps, rows = occupancy(server)
        assert rows < 16 * LONG.max_new_tokens  # it stopped being decoded
        (short,) = client.generate([PROMPTS[1]], SHORT)[0]
        more_steps, more_rows = occupancy(server)
    # The later request was decoded alone: one row in each of its steps.
    assert more_rows - rows == more_steps - steps == len(tokens(short)) - 1


def test_an_expired_request_leaves_the_engine(server):
    engine = servicer(server).engine
    big = SamplingParams(max_new_tokens=480, temperature=1.0, n=64, seed=2, ignore_eos=True)
    with GenerationClient(server.target) as client:
        with pytest.raises(DeadlineExceededError):
            client.generate(PROMPTS[:4], big, timeout=1.0)
        wait_until(lambda: engine.load().running_rows == 0)
        wait_until(lambda: aborted(server, "deadline") == 1)
        _, rows = occupancy(server)
        assert rows < 256 * big.max_new_tokens
        assert client.generate([PROMPTS[1]], SHORT)[0][0].finish_reason == "length"


# -- weight swaps under load ----------------------------------------------------------------


def perturbed(policy) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(0)
    return {
        name: (p.detach() + 0.5 * torch.randn(p.shape, generator=generator)).numpy()
        for name, p in policy.model.named_parameters()
    }


@pytest.mark.parametrize("policy_name", ["wait", "restart"])
def test_every_completion_comes_from_the_version_it_reports_while_weights_swap(
    serve, engine, tiny_models, policy_name
):
    policy = load_causal_lm(tiny_models.causal_lm)
    weights = [
        {n: p.detach().numpy().copy() for n, p in policy.model.named_parameters()},
        perturbed(policy),
    ]
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    server = serve("generation", engine=engine, swap_policy=policy_name)
    with GenerationClient(server.target) as client:
        expected = [tokens(g[0]) for g in client.generate(PROMPTS[:4], params)]
        client.update_weights(weights[1], version=1)
        expected_perturbed = [tokens(g[0]) for g in client.generate(PROMPTS[:4], params)]
    assert expected != expected_perturbed
    greedy = {0: expected, 1: expected_perturbed}  # by version parity

    stop = threading.Event()
    seen: list[tuple[int, int, list[int]]] = []
    errors: list[BaseException] = []

    def fire(worker: int):
        try:
            with GenerationClient(server.target) as client:
                i = worker
                while not stop.is_set():
                    (completion,) = client.generate([PROMPTS[i % 4]], params)[0]
                    seen.append((i % 4, completion.weights_version, tokens(completion)))
                    i += 1
        except BaseException as err:  # reported below
            errors.append(err)

    workers = [threading.Thread(target=fire, args=(w,)) for w in range(4)]
    for w in workers:
        w.start()
    try:
        with GenerationClient(server.target) as client:
            for version in range(2, 8):
                count = len(seen)
                wait_until(lambda c=count: len(seen) >= c + 2 or bool(errors))
                client.update_weights(weights[version % 2], version=version)
    finally:
        stop.set()
        for w in workers:
            w.join(120)
    assert not errors
    versions = {v for _, v, _ in seen}
    assert len(versions) >= 4
    for prompt, version, got in seen:
        assert got == greedy[version % 2][prompt], f"version {version}, prompt {prompt}"
    assert metric(server, "alignd_weight_swap_wait_seconds_count") == 7
    restarted = aborted(server, "restart")
    assert restarted > 0 if policy_name == "restart" else restarted == 0


def test_a_swap_waits_for_running_requests_and_new_ones_wait_for_it(server, tiny_models):
    """swap_policy wait: the running request ends on the old weights, one sent during the swap
    runs on the new ones."""
    policy = load_causal_lm(tiny_models.causal_lm)
    new = perturbed(policy)
    results: dict[str, object] = {}
    started = threading.Event()

    def long_stream():
        with GenerationClient(server.target) as client:
            versions = set()
            for message in client.stream(PROMPTS[0], LONG):
                versions.add(message.weights_version)
                started.set()
            results["long"] = versions

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(60)
    with GenerationClient(server.target) as client:
        update = threading.Thread(target=lambda: client.update_weights(new, version=1))
        update.start()
        wait_until(lambda: servicer(server).gate._exclusive == 1)  # the swap is waiting
        (later,) = client.generate([PROMPTS[1]], SHORT)[0]
        update.join(120)
    thread.join(120)
    assert results["long"] == {0}
    assert later.weights_version == 1
    assert metric(server, "alignd_weight_swap_wait_seconds_count") == 1


def test_a_flood_over_the_queue_limit_is_refused_at_once(serve, engine):
    server = serve("generation", engine=engine, max_queue_size=16)

    release = threading.Event()

    async def flood():
        async with AsyncGenerationClient(server.target, retries=1) as client:
            # The engine is held: nothing accepted can finish, only refusals come back.
            hold = on_loop(server, held_gate(server, lambda _: release.is_set()))
            calls = [
                asyncio.ensure_future(client.generate([PROMPTS[i % 16]], SHORT)) for i in range(64)
            ]
            deadline = time.monotonic() + 60
            while sum(c.done() for c in calls) < 48 and time.monotonic() < deadline:
                pending = [c for c in calls if not c.done()]
                await asyncio.wait(pending, timeout=1, return_when=asyncio.FIRST_COMPLETED)
            refused_while_held = sum(c.done() for c in calls)
            release.set()
            results = await asyncio.gather(*calls, return_exceptions=True)
            await asyncio.wrap_future(hold)
            return refused_while_held, results

    refused_while_held, results = asyncio.run(flood())
    assert refused_while_held == 48
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 48
    assert all(isinstance(r, ResourceExhaustedError) for r in refused), refused[:3]
    assert all("limit max_queue_size 16" in str(r) for r in refused)
    assert all(len(r[0][0].token_ids) == 4 for r in results if not isinstance(r, BaseException))


def test_shutdown_stops_a_running_request_within_a_step(serve, engine):
    """Stopping the server (SIGTERM runs the same stop) ends a long request after the grace
    period instead of decoding it to its end."""
    server = serve("generation", engine=engine, max_request_tokens=200_000, grace_s=0.1)
    engine_ = servicer(server).engine
    with GenerationClient(server.target) as client:
        stream = running_stream(client)
        server.stop(grace=0.1)
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert engine_.load() == EngineLoad(0, 0, 0, 0)
    registry = servicer(server).metrics.step_rows
    rows = next(s.value for m in registry.collect() for s in m.samples if s.name.endswith("_sum"))
    assert rows < 16 * LONG.max_new_tokens


def test_an_isolated_request_runs_alone_among_concurrent_callers(server):
    """isolated: the request's rows are batched with nothing else (its steps hold only its
    rows) and it gives the bits it gives alone."""
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=5, ignore_eos=True)
    with GenerationClient(server.target) as client:
        alone = client.generate(PROMPTS[:2], params)
    steps_before, rows_before = occupancy(server)

    async def crowd():
        async with AsyncGenerationClient(server.target) as client:
            hold = asyncio.wrap_future(on_loop(server, held_gate(server, queued(9))))
            others = [client.generate([p], GREEDY) for p in PROMPTS[2:10]]
            isolated = client.generate(PROMPTS[:2], params, isolated=True)
            results = await asyncio.gather(isolated, *others)
            await hold
            return results[0]

    got = asyncio.run(crowd())
    for a, b in zip(alone, got, strict=True):
        for x, y in zip(a, b, strict=True):
            assert tokens(x) == tokens(y)
            np.testing.assert_array_equal(x.logprobs, y.logprobs)
    steps, rows = occupancy(server)
    assert steps - steps_before < rows - rows_before  # the other callers did share steps
