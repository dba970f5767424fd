"""What a careless or hostile caller can do to the generation service: non-finite or foreign
weights, paths outside the storage root, requests that would take the whole KV cache, weight
streams left open, and calls abandoned half way. Each gets a clear error (or the right status
code) and the serving weights stay as they were."""

from __future__ import annotations

import asyncio
import gc
import logging

import grpc
import numpy as np
import pytest
from grpc import aio
from safetensors.numpy import save_file
from service_metrics import request_codes

from alignd import AsyncGenerationClient, GenerationClient, SamplingParams
from alignd.clients.generation import weight_messages
from alignd.errors import AligndError, InvalidArgumentError
from alignd.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from alignd_server.common.models import load_causal_lm

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
NORM = "model.norm.weight"


@pytest.fixture
def policy(tiny_models):
    return load_causal_lm(tiny_models.causal_lm)


@pytest.fixture
def server(serve, engine):
    return serve("generation", engine=engine, update_idle_timeout_s=0.5)


def greedy(client) -> tuple[list[int], np.ndarray]:
    (completion,) = client.generate(["Name a colour."], GREEDY)[0]
    return completion.token_ids.tolist(), completion.logprobs


def unchanged(client, before) -> None:
    ids, logprobs = greedy(client)
    assert ids == before[0]
    np.testing.assert_array_equal(logprobs, before[1])
    assert client.info().weights_version == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_before_the_commit(server, bad):
    tensor = np.ones(64, np.float32)
    tensor[7] = bad
    with GenerationClient(server.target) as client:
        before = greedy(client)
        with pytest.raises(InvalidArgumentError, match=r"header\.tensors\[0\]: .*NaN or infinite"):
            client.update_weights({NORM: tensor}, version=1, partial=True)
        unchanged(client, before)


@pytest.mark.parametrize("wire", [np.float32, np.float16])
def test_finite_weights_whose_sum_overflows_are_accepted(server, wire):
    """The finiteness check sums each tensor first; a sum that overflows is not a bad value,
    and the element-by-element check that follows lets the update through."""
    tensor = np.full(64, np.finfo(wire).max / 2, wire)
    with np.errstate(over="ignore"):
        assert not np.isfinite(tensor.sum(dtype=wire))
    with GenerationClient(server.target) as client:
        client.update_weights({NORM: tensor}, version=1, partial=True)
        assert client.info().weights_version == 1


def test_load_weights_refuses_bad_files_and_paths_outside_the_root(server, tmp_path):
    outside = tmp_path.parent.parent
    cases = {
        "nan": lambda d: save_file(
            {NORM: np.full(64, np.nan, np.float32)}, d / "model.safetensors"
        ),
        "integers": lambda d: save_file({NORM: np.ones(64, np.int32)}, d / "model.safetensors"),
        "empty": lambda d: (d / "model.safetensors").write_bytes(b""),
        "corrupt": lambda d: (d / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{"),
        "symlink": lambda d: (d / "model.safetensors").symlink_to("/etc/hostname"),
    }
    messages = {
        "nan": "NaN or infinite", "integers": "not floating point",
        "empty": "not a readable safetensors file", "corrupt": "not a readable safetensors file",
        "symlink": "leads outside the storage roots",
    }  # fmt: skip
    with GenerationClient(server.target) as client:
        before = greedy(client)
        for name, make in cases.items():
            directory = tmp_path / name
            directory.mkdir()
            make(directory)
            with pytest.raises(InvalidArgumentError, match=rf"path: .*{messages[name]}"):
                client.load_weights(str(directory), version=1, partial=True)
        for path in (str(outside), str(tmp_path / ".." / ".." / ".."), "relative/../../.."):
            with pytest.raises(InvalidArgumentError, match=r"path: .* leads outside the storage"):
                client.load_weights(path, version=1, partial=True)
        unchanged(client, before)


def test_versions_are_bounded_so_an_update_can_always_follow(server):
    with GenerationClient(server.target) as client:
        for version in (2**63 - 1, 2**32 + 1):
            with pytest.raises(InvalidArgumentError, match="a version may advance at most"):
                client.update_weights({NORM: np.ones(64, np.float32)}, version, partial=True)
            with pytest.raises(InvalidArgumentError, match=r"version: .* a version may advance"):
                client.load_weights("weights", version=version)
        client.update_weights({NORM: np.ones(64, np.float32)}, 2**32, partial=True)
        assert client.info().weights_version == 2**32


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rendezvous": "nohost"}, r"rendezvous: 'nohost' must be HOST:PORT"),
        ({"group": "../x"}, "group: must be 32 lowercase hex digits"),
        ({"bucket_bytes": 1 << 40}, r"bucket_bytes: must be in \[1024, "),
        ({"timeout_seconds": -1.0}, r"timeout_seconds: must be in \(0, 3600\]"),
        ({"header": generation_pb2.WeightsHeader(version=0)}, "header.version"),
    ],
)
def test_receive_weights_checks_the_request_before_it_connects(server, fields, message):
    request = generation_pb2.ReceiveWeightsRequest(
        header=generation_pb2.WeightsHeader(version=5, tensors=[generation_pb2.TensorSpec(
            name=NORM, dtype=common_pb2.DTYPE_FLOAT32, shape=[64])], partial=True),
        rendezvous="127.0.0.1:1", group="0" * 32,
    )  # fmt: skip
    for key, value in fields.items():
        if key == "header":
            request.header.CopyFrom(value)
        else:
            setattr(request, key, value)
    with GenerationClient(server.target) as client:
        with pytest.raises(InvalidArgumentError, match=message):
            client.receive_weights(request)
        assert client.info().weights_version == 0


def test_a_tiny_temperature_is_refused(server):
    with GenerationClient(server.target) as client:
        for temperature in (1e-30, 0.009, float("nan"), 101.0):
            with pytest.raises(InvalidArgumentError, match=r"params\.temperature: must be in"):
                client.generate(["hi"], SamplingParams(max_new_tokens=2, temperature=temperature))
        assert client.generate(["hi"], SamplingParams(max_new_tokens=2, temperature=0.01))


def test_the_work_of_one_request_is_bounded(serve):
    server = serve("generation", max_request_tokens=64)
    with GenerationClient(server.target) as client:
        assert client.info().server.limits.max_request_tokens == 64
        many = SamplingParams(max_new_tokens=20, n=4, ignore_eos=True)
        with pytest.raises(InvalidArgumentError, match=r"prompts: .*max_request_tokens 64"):
            client.generate(["hi"], many)  # 4 rows x (prompt + 20) > 64
        with pytest.raises(InvalidArgumentError, match=r"prompt: .*max_request_tokens 64"):
            list(client.stream("hi", many))
        assert client.generate(["hi"], SamplingParams(max_new_tokens=4, n=2))


def test_oversized_texts_are_refused_before_tokenization(server):
    with GenerationClient(server.target) as client:
        limit = client.info().server.limits.max_text_bytes
        assert limit == 2048 * 32  # max(512 positions, 2048) x 32 bytes
        with pytest.raises(InvalidArgumentError, match=r"prompts\[0\]: is more than 65536 bytes"):
            client.generate(["x" * (8 << 20)], GREEDY)
        chat = [{"role": "user", "content": "y" * 40000}, {"role": "user", "content": "z" * 40000}]
        with pytest.raises(InvalidArgumentError, match="messages are more than 65536 bytes"):
            client.generate([chat], GREEDY)


def test_the_sequence_limit_follows_the_model(server):
    with GenerationClient(server.target) as client:
        assert client.info().server.limits.max_sequence_length == 512  # the tiny model's limit
        with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
            client.generate(["hi"], SamplingParams(max_new_tokens=512))


def test_a_zero_element_tensor_with_a_huge_dimension_is_an_invalid_argument(server):
    prompt = common_pb2.Prompt(
        token_ids=common_pb2.Tensor(dtype=common_pb2.DTYPE_INT32, shape=[0, 2**63 - 1])
    )
    request = generation_pb2.GenerateRequest(
        prompts=[prompt], params=generation_pb2.SamplingParams(max_new_tokens=2)
    )
    with GenerationClient(server.target) as client:
        with pytest.raises(InvalidArgumentError, match="larger than any array can be"):
            client._call("Generate", request)


async def _header_then(wait: asyncio.Event):
    messages = weight_messages({NORM: np.ones(64, np.float32)}, 1, partial=True)
    yield next(messages)
    await wait.wait()


async def test_an_idle_update_stream_is_dropped_and_releases_the_lock(server):
    release = asyncio.Event()
    async with aio.insecure_channel(server.target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.UpdateWeights(_header_then(release), timeout=60)
        release.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "update_idle_timeout_s 0.5" in err.value.details()
    async with AsyncGenerationClient(server.target) as client:  # the lock is free again
        update = await client.update_weights({NORM: np.ones(64, np.float32)}, 1, partial=True)
        assert update.version == 1


async def test_an_update_stream_has_a_total_time_bound(serve):
    server = serve("generation", update_timeout_s=1.0, update_idle_timeout_s=30.0)
    messages = list(weight_messages({NORM: np.ones(64, np.float32)}, 1, partial=True))

    async def trickle():
        yield messages[0]
        while True:  # messages that keep the stream alive, never finishing it
            await asyncio.sleep(0.2)
            yield generation_pb2.UpdateWeightsRequest(
                chunk=generation_pb2.TensorChunk(name=NORM, offset=0, data=b"")
            )

    async with aio.insecure_channel(server.target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.UpdateWeights(trickle(), timeout=60)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "update_timeout_s 1" in err.value.details()


async def test_abandoned_calls_count_as_cancelled_without_stray_errors(server, caplog):
    gc.collect()  # what earlier tests' servers left to collect is reported now, not below
    caplog.clear()
    caplog.set_level(logging.ERROR)
    release = asyncio.Event()
    async with aio.insecure_channel(server.target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        update = stub.UpdateWeights(_header_then(release))
        await update.initial_metadata()  # the server took the header
        update.cancel()
        stream = stub.GenerateStream(
            generation_pb2.GenerateStreamRequest(
                prompt=common_pb2.Prompt(text="hello"),
                params=generation_pb2.SamplingParams(max_new_tokens=200, ignore_eos=True),
            )
        )
        async for _ in stream:
            stream.cancel()  # mid-stream
            break
        release.set()
    for method in ("UpdateWeights", "GenerateStream"):
        for _ in range(200):  # the server counts the call when it has seen it end
            if request_codes(server, method):
                break
            await asyncio.sleep(0.05)
        assert request_codes(server, method) == {"CANCELLED": 1.0}, method
    gc.collect()  # a task whose exception nobody retrieved is reported when it is collected
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_rejected_updates_report_their_own_status_under_concurrency(server, policy):
    weights = {n: p.detach().numpy() for n, p in policy.model.named_parameters()}
    async with AsyncGenerationClient(server.target, retries=1) as client:

        async def push(version: int) -> str:
            try:
                await client.update_weights(weights, version)
            except AligndError as err:
                return err.code.name
            return "OK"

        results = await asyncio.gather(*(push(v) for v in [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]))
    assert "INTERNAL" not in results and "UNKNOWN" not in results
    assert set(results[:4]) <= {"INVALID_ARGUMENT", "ABORTED"}  # version 0 never lands
    assert "OK" in results[4:] and set(results[4:]) <= {"OK", "ABORTED", "INVALID_ARGUMENT"}


async def test_the_queue_limit_is_enforced_before_tokenizing(serve, monkeypatch):
    import threading

    from alignd.errors import ResourceExhaustedError
    from alignd_server.generation.hf_engine import HFEngine

    entered, gate = threading.Event(), threading.Event()
    original = HFEngine._prefill

    def gated(self, *args):
        entered.set()
        gate.wait(30)
        return original(self, *args)

    monkeypatch.setattr(HFEngine, "_prefill", gated)
    server = serve("generation", engine="hf", max_queue_size=2)
    params = SamplingParams(max_new_tokens=2, n=2)
    try:
        async with AsyncGenerationClient(server.target, retries=1) as client:
            assert (await client.info()).server.limits.max_queue_size == 2
            first = asyncio.ensure_future(client.generate(["hi"], params))  # 2 rows
            assert await asyncio.to_thread(entered.wait, 30)
            with pytest.raises(ResourceExhaustedError, match="limit max_queue_size 2"):
                await client.generate(["x" * 60000], SamplingParams(max_new_tokens=2))
            gate.set()
            assert len((await first)[0]) == 2
            assert await client.generate(["hi"], params)  # the rows were counted off again
    finally:
        gate.set()


def test_settings_a_service_does_not_use_are_refused():
    from pydantic import ValidationError

    from alignd_server.generation.config import GenerationSettings
    from alignd_server.trainer.config import TrainerSettings

    for cls, name in [(GenerationSettings, "max_wait_ms"), (GenerationSettings,
                      "max_batch_tokens"), (TrainerSettings, "max_queue_size"),
                      (TrainerSettings, "max_wait_ms")]:  # fmt: skip
        with pytest.raises(ValidationError, match=name):
            cls(**{name: 5})
    for name in ["gpu_memory_utilization", "tensor_parallel_size", "max_num_batched_tokens",
                 "enable_prefix_caching"]:  # fmt: skip
        with pytest.raises(ValidationError, match=f"{name} is a setting of the vllm engine"):
            GenerationSettings(**{name: 1})
    with pytest.raises(ValidationError, match="max_running_tokens is a setting of the hf engine"):
        GenerationSettings(engine="vllm", max_running_tokens=5)
