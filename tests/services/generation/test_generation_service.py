"""GenerationService (hf engine) over a real loopback server."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch

from alignd import GenerationClient, SamplingParams
from alignd.clients.generation import ACCEPTED_KEY, weight_messages
from alignd.errors import AbortedError, InvalidArgumentError
from alignd.v1 import generation_pb2
from alignd_server.common.models import load_causal_lm

CHATS = [
    [{"role": "user", "content": "Hello there, how are you today?"}],
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Tell me a short story about a river and a mountain."}],
]


@pytest.fixture
def policy(tiny_models):
    return load_causal_lm(tiny_models.causal_lm)


@pytest.fixture
def server(serve, engine):
    return serve("generation", engine=engine)


def test_greedy_equals_in_process_generate_for_a_mixed_length_batch(server, policy):
    with GenerationClient(server.target) as client:
        results = client.generate(CHATS, SamplingParams(max_new_tokens=20, temperature=0))
    assert [len(r) for r in results] == [1, 1, 1]
    for result in results:
        (completion,) = result
        prompt = torch.tensor(completion.prompt_token_ids[None].tolist())
        expected = policy.model.generate(
            prompt, max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=2
        )[0, prompt.shape[1] :]
        assert completion.token_ids.tolist() == expected.tolist()
        assert completion.weights_version == 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_log_softmax_of_logits_over_temperature(server, policy, temperature):
    params = SamplingParams(max_new_tokens=16, temperature=temperature, seed=3, ignore_eos=True)
    with GenerationClient(server.target) as client:
        results = client.generate(CHATS[:2], params)
    for (completion,) in results:
        sequence = np.concatenate([completion.prompt_token_ids, completion.token_ids])
        with torch.inference_mode():
            logits = policy.model(torch.as_tensor(sequence[None], dtype=torch.long)).logits[0]
        logprobs = torch.log_softmax(logits.double() / temperature, dim=-1)
        p = len(completion.prompt_token_ids)
        expected = logprobs[torch.arange(p - 1, len(sequence) - 1), sequence[p:]].numpy()
        np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4)
        assert completion.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_n_samples_differ(server):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=4, seed=7, ignore_eos=True)
    with GenerationClient(server.target) as client:
        first = client.generate(CHATS[:1], params)[0]
        again = client.generate(CHATS, params)[0]  # other prompts in the batch: same samples
        other = client.generate(CHATS[:1], SamplingParams(**{**params.__dict__, "seed": 8}))[0]
    tokens = [c.token_ids.tolist() for c in first]
    assert tokens == [c.token_ids.tolist() for c in again]
    assert len({tuple(t) for t in tokens}) == 4
    assert tokens != [c.token_ids.tolist() for c in other]


def test_stop_strings_and_stop_tokens_end_completions(server):
    with GenerationClient(server.target) as client:
        (free,) = client.generate(CHATS[2:], SamplingParams(max_new_tokens=24, temperature=0))[0]
        token = int(free.token_ids[3])
        stopped = client.generate(
            CHATS[2:], SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[token])
        )[0][0]
        stop_text = free.text[len(free.text) // 2 :][:3]
        by_string = client.generate(
            CHATS[2:], SamplingParams(max_new_tokens=24, temperature=0, stop=[stop_text])
        )[0][0]
    first = free.token_ids.tolist().index(token)
    assert stopped.token_ids.tolist() == free.token_ids[: first + 1].tolist()
    assert stopped.finish_reason == "stop"
    assert by_string.finish_reason == "stop"
    assert stop_text not in by_string.text
    assert free.text.startswith(by_string.text)


def test_stream_yields_the_same_tokens_as_generate(server):
    params = SamplingParams(max_new_tokens=10, temperature=0)
    with GenerationClient(server.target) as client:
        (expected,) = client.generate(CHATS[:1], params)[0]
        messages = list(client.stream(CHATS[0], params))
    tokens = [int(t) for m in messages for t in np.frombuffer(m.token_ids.data, "<i4")]
    assert tokens == expected.token_ids.tolist()
    assert "".join(m.text for m in messages) == expected.text
    assert messages[0].HasField("prompt_token_ids")
    assert messages[-1].finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED


def perturbed(policy, scale=0.5) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(0)
    return {
        name: (p.detach() + scale * torch.randn(p.shape, generator=generator)).numpy()
        for name, p in policy.model.named_parameters()
    }


def test_weight_update_round_trip(server, policy):
    greedy = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    originals = {n: p.detach().numpy().copy() for n, p in policy.model.named_parameters()}
    with GenerationClient(server.target) as client:
        before = client.generate(CHATS, greedy)
        response = client.update_weights(perturbed(policy), version=1)
        assert (response.version, response.partial) == (1, False)
        assert response.tensors_updated == len(originals)
        changed = client.generate(CHATS, greedy)
        assert changed[0][0].weights_version == 1
        assert [r[0].token_ids.tolist() for r in changed] != [
            r[0].token_ids.tolist() for r in before
        ]
        client.update_weights(originals, version=2)
        restored = client.generate(CHATS, greedy)
        assert client.info().weights_version == 2
    for a, b in zip(before, restored, strict=True):
        assert a[0].token_ids.tolist() == b[0].token_ids.tolist()
        np.testing.assert_array_equal(a[0].logprobs, b[0].logprobs)


def test_weights_received_over_the_collective_transport_serve_as_streamed_ones(server, policy):
    """ReceiveWeights (the trainer's collective push, on loopback) swaps in exactly what
    UpdateWeights swaps in: the same greedy tokens and log-probs, under the new version."""
    import asyncio

    from alignd_server.trainer.config import TrainerSettings
    from alignd_server.trainer.push import push_collective

    greedy = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    weights = perturbed(policy)
    originals = {n: p.detach().numpy().copy() for n, p in policy.model.named_parameters()}
    with GenerationClient(server.target) as client:
        client.update_weights(weights, version=1)
        streamed = client.generate(CHATS, greedy)
        client.update_weights(originals, version=2)
        (result,) = asyncio.run(push_collective(
            weights, [server.target], 3, 120.0, ("127.0.0.1", 0), 1 << 20, TrainerSettings()
        ))  # fmt: skip
        assert result.ok, result.error
        assert result.bytes == sum(w.nbytes for w in weights.values())
        received = client.generate(CHATS, greedy)
        assert client.info().weights_version == 3
    for a, b in zip(streamed, received, strict=True):
        assert b[0].weights_version == 3
        assert a[0].token_ids.tolist() == b[0].token_ids.tolist()
        np.testing.assert_array_equal(a[0].logprobs, b[0].logprobs)


def test_hf_engine_updates_a_tied_weight_under_either_of_its_names(serve, policy):
    """The tiny model ties lm_head.weight to model.embed_tokens.weight: an update naming either
    replaces the one tensor both are."""
    greedy = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    embedding = perturbed(policy)["model.embed_tokens.weight"]
    with GenerationClient(serve("generation", engine="hf").target) as client:
        before = client.generate(CHATS, greedy)
        client.update_weights({"lm_head.weight": embedding}, version=1, partial=True)
        by_head = client.generate(CHATS, greedy)
        client.update_weights({"model.embed_tokens.weight": embedding}, version=2, partial=True)
        by_embedding = client.generate(CHATS, greedy)
    for a, b, c in zip(before, by_head, by_embedding, strict=True):
        assert not np.array_equal(a[0].logprobs, b[0].logprobs)
        assert b[0].token_ids.tolist() == c[0].token_ids.tolist()
        np.testing.assert_array_equal(b[0].logprobs, c[0].logprobs)


def test_partial_updates_and_truncated_streams(server, policy):
    name = "model.norm.weight"
    with GenerationClient(server.target) as client:
        with pytest.raises(InvalidArgumentError, match=r"parameters missing .* set partial"):
            client.update_weights({name: np.ones(64, np.float32)}, version=1)
        ok = client.update_weights({name: np.ones(64, np.float32)}, version=1, partial=True)
        assert (ok.version, ok.tensors_updated, ok.partial) == (1, 1, True)
        truncated = list(weight_messages(perturbed(policy), 2, partial=False))[:-1]
        with pytest.raises(grpc.RpcError) as err:
            client._stub.UpdateWeights(iter(truncated), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ended before its commit" in err.value.details()
        assert client.info().weights_version == 1


@pytest.mark.parametrize(
    ("tensors", "version", "message"),
    [
        ({"nope.weight": np.zeros(3, np.float32)}, 1, r"header\.tensors\[0\]\.name: 'nope.weight'"),
        ({"model.norm.weight": np.zeros(5, np.float32)}, 1, r"shape: \[5\] does not match \[64\]"),
        ({"model.norm.weight": np.zeros(64, np.float32)}, 0, r"header\.version: 0 must be greater"),
        ({"model.norm.weight": np.zeros(64, np.int32)}, 1, r"dtype: must be FLOAT32"),
    ],
)
def test_bad_updates_are_rejected_and_the_old_weights_keep_serving(
    server, tensors, version, message
):
    with GenerationClient(server.target) as client:
        with pytest.raises(InvalidArgumentError, match=message):
            client.update_weights(tensors, version=version, partial=True)
        assert client.info().weights_version == 0


def test_concurrent_updates_are_refused(server, policy):
    gate = threading.Event()

    def slow():
        messages = weight_messages({"model.norm.weight": np.ones(64, np.float32)}, 1, partial=True)
        yield next(messages)  # the header, then wait
        gate.wait(10)
        yield from messages

    with GenerationClient(server.target) as client:
        future = client._stub.UpdateWeights.future(slow(), timeout=30)
        # The server answers the header once it holds the update, before it reads on.
        assert dict(future.initial_metadata()).get(ACCEPTED_KEY) == "accepted"
        with pytest.raises(AbortedError, match="another weight update is in progress"):
            client.update_weights({"model.norm.weight": np.ones(64, np.float32)}, 2, partial=True)
        gate.set()
        assert future.result().version == 1


def test_load_weights_from_a_directory(server, policy, tmp_path):
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    for name, value in perturbed(policy).items():
        policy.model.get_parameter(name).data.copy_(torch.from_numpy(value))
    policy.model.save_pretrained(tmp_path / "ckpt")
    with GenerationClient(server.target) as client:
        before = client.generate(CHATS[:1], greedy)[0][0]
        response = client.load_weights(str(tmp_path / "ckpt"), version=5)
        assert response.version == 5 and response.bytes > 0
        after = client.generate(CHATS[:1], greedy)[0][0]
        with pytest.raises(InvalidArgumentError, match=r"path: .* is not a directory"):
            client.load_weights(str(tmp_path / "missing"), version=6)
    assert after.weights_version == 5
    assert after.token_ids.tolist() != before.token_ids.tolist()


@pytest.mark.parametrize(
    ("params", "prompts", "message"),
    [
        (
            SamplingParams(max_new_tokens=0),
            ["hi"],
            r"params\.max_new_tokens: 0 is outside \[1, 1024\]",
        ),
        (SamplingParams(max_new_tokens=5000), ["hi"], r"params\.max_new_tokens: 5000"),
        (SamplingParams(top_p=0.0), ["hi"], r"params\.top_p: 0\.0 is outside \(0, 1\]"),
        (SamplingParams(top_p=1.5), ["hi"], r"params\.top_p"),
        (SamplingParams(temperature=-1.0), ["hi"], r"params\.temperature"),
        (SamplingParams(n=65), ["hi"], r"params\.n: 65 is outside \[1, 64\]"),
        (SamplingParams(top_k=-1), ["hi"], r"params\.top_k"),
        (SamplingParams(stop_token_ids=[10**6]), ["hi"], r"params\.stop_token_ids\[0\]"),
        (SamplingParams(), [""], r"prompts\[0\]: must not be empty"),
        (SamplingParams(), [], r"prompts: 0 prompts"),
        (SamplingParams(), [np.array([1, 10**6], np.int32)], r"prompts\[0\]"),
    ],
)
def test_bad_requests_are_invalid_arguments_naming_the_field(server, params, prompts, message):
    with GenerationClient(server.target) as client:
        with pytest.raises(InvalidArgumentError, match=message):
            client.generate(prompts, params)


def test_generation_metrics_are_exported(server):
    import urllib.request

    with GenerationClient(server.target) as client:
        client.generate(CHATS[:2], SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))
        client.update_weights({"model.norm.weight": np.ones(64, np.float32)}, 3, partial=True)
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    page = urllib.request.urlopen(url, timeout=10).read().decode()
    assert "alignd_generated_tokens_total 10.0" in page
    assert "alignd_generation_batch_size_count 1.0" in page
    assert "alignd_time_to_first_token_seconds_count 1.0" in page
    assert "alignd_weights_version 3.0" in page
    assert "alignd_weight_update_bytes_total 256.0" in page


def test_async_generation_client(server):
    import asyncio

    from alignd import AsyncGenerationClient

    params = SamplingParams(max_new_tokens=6, temperature=0)

    async def main():
        async with AsyncGenerationClient(server.target) as client:
            results = await client.generate(CHATS[:1], params)
            streamed = [m async for m in client.stream(CHATS[0], params)]
            update = await client.update_weights(
                {"model.norm.weight": np.ones(64, np.float32)}, 1, partial=True
            )
            return results, streamed, update

    results, streamed, update = asyncio.run(main())
    tokens = [int(t) for m in streamed for t in np.frombuffer(m.token_ids.data, "<i4")]
    assert tokens == results[0][0].token_ids.tolist()
    assert update.version == 1
