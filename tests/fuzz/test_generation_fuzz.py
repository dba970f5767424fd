"""GenerationService under malformed requests: every RPC answers with a bad-input code, never
INTERNAL, and afterwards valid requests get exactly the completions they got before.

Weight updates are the one way a request may change what the service answers. The valid ones
the fuzz draws carry the model's own weights, so they change nothing but the version; still,
after every accepted update the original weights are loaded again (LoadWeights of the model
directory, the next version) and after every refused one the version must be unchanged. The
final check compares greedy and seeded completions (ids and log-probs), a stream and a
tokenization with those before the fuzz, and the version with the last one installed.
"""

from __future__ import annotations

import os
import shutil

import grpc
import numpy as np
import pytest
from fuzzing import Fuzzer, budgets, check_counts
from hypothesis import strategies as st
from malformed import (
    DTYPES,
    HUGE_SHAPES,
    MiB,
    batch,
    enums,
    floats,
    hostile_paths,
    int32s,
    optional,
    path,
    prompt,
    raw_requests,
    requests,
    tokenize_requests,
    uint64s,
    version,
    wild_floats,
)
from safetensors.numpy import load_file, save_file

from alignd import GenerationClient, SamplingParams
from alignd.v1 import common_pb2, generation_pb2

SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"]
MAX_BATCH, MAX_NEW = 8, 4
FULL = {
    "Generate": 1100,
    "GenerateStream": 450,
    "UpdateWeights": 900,
    "LoadWeights": 450,
    "Tokenize": 500,
    "GetInfo": 150,
}
F32 = common_pb2.DTYPE_FLOAT32
DAMAGES = (
    "nan", "inf", "offset", "name", "extra", "short", "oversize", "chunk_first", "header_twice",
    "empty_message", "after_commit", "no_commit", "total", "reorder", "no_messages", "no_header",
)  # fmt: skip


def sampling(f, vocab: int) -> generation_pb2.SamplingParams:
    return generation_pb2.SamplingParams(
        max_new_tokens=f(st.integers(1, MAX_NEW), int32s(MAX_NEW + 1, 1024)),
        temperature=f(optional(st.one_of(st.just(0.0), floats(0.01, 100))), wild_floats()),
        top_p=f(optional(floats(0.01, 1)), wild_floats()),
        top_k=f(st.integers(0, 500), int32s()),
        n=f(st.integers(0, 3), int32s(64, 65)),
        seed=f.draw(optional(uint64s())),
        stop=f(
            st.lists(st.text(min_size=1, max_size=8), max_size=2),
            st.sampled_from([[""], ["s" * 257], ["a"] * 17]),
        ),
        stop_token_ids=f(
            st.lists(st.integers(0, vocab - 1), max_size=2),
            st.one_of(st.lists(int32s(), max_size=3), st.just([1] * 65)),
        ),
        ignore_eos=f.draw(st.booleans()),
        skip_special_tokens=f.draw(optional(st.booleans())),
    )


def generate_requests(vocab: int) -> st.SearchStrategy:
    return requests(
        lambda f: generation_pb2.GenerateRequest(
            prompts=batch(f, lambda f: prompt(f, vocab), MAX_BATCH),
            params=f(st.just(sampling(f, vocab)), st.none()),
        )
    )


def stream_requests(vocab: int) -> st.SearchStrategy:
    return requests(
        lambda f: generation_pb2.GenerateStreamRequest(
            prompt=prompt(f, vocab),
            params=f(st.just(sampling(f, vocab)), st.none()),
        )
    )


def encoded(values: np.ndarray, dtype: int) -> bytes:
    """``values`` as the bytes of a float ``dtype``; float32 for any other."""
    if dtype == common_pb2.DTYPE_BFLOAT16:  # the upper half of each float32
        return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return values.astype("<f2" if dtype == common_pb2.DTYPE_FLOAT16 else "<f4").tobytes()


def update_streams(weights: dict[str, np.ndarray], serving) -> st.SearchStrategy:
    """UpdateWeights streams of the model's own weights (a subset, partial, or all of them), or
    (wild) with a bad version, names, dtypes (float16 and bfloat16 ones carry the weights
    rounded) or shapes in the header, or damaged messages."""
    names = sorted(weights)

    def build(f) -> list:
        full = f.draw(st.sampled_from([True, False, False]))
        chosen = (
            names
            if full
            else f.draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True))
        )
        chosen = f(
            st.just(chosen),
            st.sampled_from(
                [
                    [],
                    ["nope"],
                    ["", names[0]],
                    [names[0], names[0]],
                    ["model.embed_tokens.weight", "lm_head.weight"],
                ]
            ),
        )
        specs = [
            generation_pb2.TensorSpec(
                name=name,
                dtype=f(st.just(F32), enums(DTYPES)),
                shape=f(
                    st.just(list(weights.get(name, np.zeros(1)).shape)),
                    st.sampled_from(HUGE_SHAPES),
                ),
            )
            for name in chosen
        ]
        header = generation_pb2.WeightsHeader(
            version=version(f, serving()),
            tensors=specs,
            partial=f(st.just(not full), st.booleans()),
        )
        chunks = []
        for spec in specs:  # the weights in the header's dtype (float32 for the others)
            data = encoded(weights.get(spec.name, np.zeros(4, np.float32)), spec.dtype)
            size = f.draw(st.sampled_from([len(data), 4096, 1000, MiB]))
            chunks += [
                generation_pb2.TensorChunk(name=spec.name, offset=at, data=data[at : at + size])
                for at in range(0, len(data), size)
            ]
        commit = generation_pb2.WeightsCommit(total_bytes=sum(len(c.data) for c in chunks))
        damage = f(st.none(), st.sampled_from(DAMAGES))
        return damaged(f, damage, header, chunks, commit)

    return requests(build)


def damaged(f, damage, header, chunks, commit) -> list[generation_pb2.UpdateWeightsRequest]:
    """The stream header, chunks, commit, with ``damage`` (None = none) done to it."""
    message = generation_pb2.UpdateWeightsRequest
    if chunks and damage in ("nan", "inf"):
        bad = np.float32(np.nan if damage == "nan" else np.inf).tobytes()
        chunks[0].data = bad + chunks[0].data[4:]
    elif chunks and damage == "offset":
        chunks[-1].offset += f.draw(st.sampled_from([-1, 1, 2**62]))
    elif chunks and damage == "name":
        chunks[-1].name = f.draw(st.sampled_from(["nope", "", "lm_head.weight"]))
    elif chunks and damage == "extra":
        chunks[-1].data += b"\x00"
    elif chunks and damage == "short":
        chunks.pop()
    elif chunks and damage == "oversize":
        chunks[0].data = bytes(4 * MiB + 1)
    elif chunks and damage == "reorder":
        chunks.reverse()
    elif damage == "total":
        commit.total_bytes = f.draw(st.sampled_from([commit.total_bytes + 1, -1, 2**63 - 1]))
    stream = [message(header=header), *(message(chunk=c) for c in chunks), message(commit=commit)]
    if damage == "chunk_first" and chunks:
        stream.insert(0, stream.pop(1))
    elif damage == "header_twice":
        stream.insert(1, message(header=header))
    elif damage == "empty_message":
        stream.insert(f.draw(st.integers(0, len(stream))), message())
    elif damage == "after_commit":
        stream.append(f.draw(st.sampled_from(stream)))
    elif damage == "no_commit":
        stream.pop()
    elif damage == "no_messages":
        stream = []
    elif damage == "no_header":
        stream.pop(0)
    return stream


def weight_directories(model_dir, tmp_path, root) -> tuple[list[str], list[str]]:
    """(directories holding the model's own weights, directories LoadWeights must refuse);
    one of the first is relative to the storage ``root``."""
    weights = load_file(str(model_dir / "model.safetensors"))
    name = "model.norm.weight"
    made = {}

    def directory(label: str, tensors: dict | None = None, raw: bytes | None = None):
        made[label] = tmp_path / label
        made[label].mkdir()
        if tensors is not None:
            save_file(tensors, str(made[label] / "model.safetensors"))
        if raw is not None:
            (made[label] / "model.safetensors").write_bytes(raw)

    directory("nan", {**weights, name: np.full(64, np.nan, np.float32)})
    directory("shape", {**weights, name: np.ones(65, np.float32)})
    directory("unknown", {**weights, "nope": np.ones(2, np.float32)})
    directory("integers", {**weights, name: np.ones(64, np.int32)})
    directory("partial", {name: weights[name]})
    directory("garbage", raw=os.urandom(256))
    directory("truncated", raw=(model_dir / "model.safetensors").read_bytes()[:1000])
    directory("huge_header", raw=(2**62).to_bytes(8, "little") + b"{}")
    directory("empty")
    directory("escape")
    (made["escape"] / "model.safetensors").symlink_to("/etc/hostname")
    (tmp_path / "outside").symlink_to("/etc")
    (tmp_path / "file").write_text("not a directory")
    bad = [str(d) for d in made.values()] + [
        str(tmp_path / "outside"),
        str(tmp_path / "file"),
        str(tmp_path / "file" / "sub"),
        str(tmp_path / "missing"),
        *hostile_paths(tmp_path),
    ]
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    return [str(model_dir), str(copy), os.path.relpath(copy, root)], bad


def answers(client: GenerationClient) -> list:
    """What valid requests get: greedy and seeded completions (ids and log-probs), a stream, a
    tokenization."""
    prompts = [[{"role": "user", "content": "Name a colour."}], "The quick brown fox"]
    greedy = client.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, temperature=0))
    sampled = client.generate(
        prompts,
        SamplingParams(max_new_tokens=MAX_NEW, temperature=0.7, seed=3, n=2, ignore_eos=True),
    )
    stream = client.stream(prompts[0], SamplingParams(max_new_tokens=MAX_NEW, temperature=0))
    streamed = [(m.index, m.token_ids.data, m.logprobs.data) for m in stream]
    out = [c.token_ids for group in greedy + sampled for c in group]
    out += [c.logprobs for group in greedy + sampled for c in group]
    out += [np.asarray(streamed, dtype=object), client.tokenize(prompts)[1].input_ids]
    return out


@pytest.mark.parametrize("budget", budgets(FULL))
def test_generation_refuses_malformed_requests_and_answers_valid_ones_unchanged(
    serve, engine, tiny_models, tmp_path, storage_root, budget
):
    server = serve(
        "generation",
        engine=engine,
        max_new_tokens=MAX_NEW,
        max_batch_size=MAX_BATCH,
        max_request_tokens=4096,
    )
    model_dir = tiny_models.causal_lm
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied: a name of its own
    good_dirs, bad_dirs = weight_directories(model_dir, tmp_path, storage_root)
    with (
        GenerationClient(server.target, retries=1) as client,
        Fuzzer(server.target, SERVICE) as fuzz,
    ):
        vocab = client.info().server.model.vocab_size
        before = answers(client)
        serving = [0]

        def settle(shot, answer) -> None:
            """Puts the model's own weights back after an update; checks that a refused one
            changed nothing."""
            if answer.code == grpc.StatusCode.DEADLINE_EXCEEDED:  # it may still have swapped:
                client.generate(["x"], SamplingParams(max_new_tokens=1))  # wait for that
            now = client.info().weights_version
            if answer.code == grpc.StatusCode.OK or now != serving[0]:
                assert answer.code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
                serving[0] = client.load_weights(str(model_dir), now + 1).version

        def load_requests(f) -> generation_pb2.LoadWeightsRequest:
            return generation_pb2.LoadWeightsRequest(
                path=path(f, good_dirs, bad_dirs),
                version=version(f, serving[0]),
                partial=f.draw(st.booleans()),
            )

        runs = {
            "Generate": (generate_requests(vocab), None),
            "GenerateStream": (stream_requests(vocab), None),
            "UpdateWeights": (update_streams(weights, lambda: serving[0]), settle),
            "LoadWeights": (requests(load_requests), settle),
            "Tokenize": (tokenize_requests(vocab, MAX_BATCH), None),
            "GetInfo": (raw_requests(), None),
        }
        for method, (strategy, after) in runs.items():
            fuzz.run(method, strategy, budget[method], after)
            for a, b in zip(answers(client), before, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"after fuzzing {method}")
        check_counts(fuzz, budget)
        completion = client.generate(["x"], SamplingParams(max_new_tokens=1))[0][0]
        assert completion.weights_version == serving[0]
