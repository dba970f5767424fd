"""The reward service's Open Inference Protocol endpoint over a real loopback server: every
RPC, raw and typed contents, the same scores as Score, and a clear error for each bad input."""

from __future__ import annotations

import re
import struct

import grpc
import numpy as np
import pytest
from service_metrics import scrape

from alignd import RewardClient
from alignd.v1 import open_inference_pb2 as oip
from alignd.v1 import open_inference_pb2_grpc as oip_grpc

PROMPTS = ["How is the weather?", "Tell me a story about a dragon.", "Hi"]
RESPONSES = ["Sunny and warm.", "Once upon a time", ""]
SCORER = "alignd.tasks.sentiment:oracle_scorer"


def raw(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


def tensor(name: str, values: list[str], datatype: str = "BYTES", shape=None):
    return oip.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape or [len(values)],
        contents=oip.InferTensorContents(bytes_contents=[v.encode() for v in values]),
    )  # fmt: skip


@pytest.fixture
def server(serve):
    return serve("reward", scorers=[f"oracle=function:{SCORER}"], max_batch_size=8)


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def test_metadata_and_readiness(stub):
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name="oracle", version="1")).ready
    metadata = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert metadata.name == "alignd" and metadata.version
    model = stub.ModelMetadata(oip.ModelMetadataRequest(name="default"))
    assert (model.name, list(model.versions), model.platform) == ("default", ["1"], "alignd_reward")
    inputs = [(t.name, t.datatype, list(t.shape)) for t in model.inputs]
    assert inputs == [(n, "BYTES", [-1]) for n in ("prompt", "response", "label")]
    assert [(t.name, t.datatype) for t in model.outputs] == [("score", "FP32")]
    for call, request in (
        (stub.ModelReady, oip.ModelReadyRequest(name="nope")),
        (stub.ModelMetadata, oip.ModelMetadataRequest(name="default", version="2")),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(request)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "default" in caught.value.details()


def test_model_infer_scores_as_score_does_in_both_forms(server, stub):
    with RewardClient(server.target) as client:
        expected = client.score(PROMPTS, RESPONSES)
        labelled = client.score(["q", "q"], ["great", "awful"], scorer="oracle",
                                labels=["x", "y"])  # fmt: skip
    typed = stub.ModelInfer(oip.ModelInferRequest(
        model_name="default", id="r1",
        inputs=[tensor("prompt", PROMPTS), tensor("response", RESPONSES, shape=[3, 1])],
    ))  # fmt: skip
    (output,) = typed.outputs
    assert (typed.id, typed.model_name, typed.model_version) == ("r1", "default", "1")
    assert (output.name, output.datatype, list(output.shape)) == ("score", "FP32", [3])
    np.testing.assert_allclose(output.contents.fp32_contents, expected, atol=1e-5)
    shapes = oip.ModelInferRequest.InferInputTensor
    raw_request = oip.ModelInferRequest(
        model_name="default",
        inputs=[shapes(name="prompt", datatype="BYTES", shape=[3]),
                shapes(name="response", datatype="BYTES", shape=[3])],
        raw_input_contents=[raw(PROMPTS), raw(RESPONSES)],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="score")],
    )  # fmt: skip
    answer = stub.ModelInfer(raw_request)
    assert not answer.outputs[0].contents.fp32_contents
    np.testing.assert_allclose(np.frombuffer(answer.raw_output_contents[0], "<f4"), expected,
                               atol=1e-5)  # fmt: skip
    with_labels = stub.ModelInfer(oip.ModelInferRequest(model_name="oracle", inputs=[
        tensor("prompt", ["q", "q"]), tensor("response", ["great", "awful"]),
        tensor("label", ["x", "y"])]))  # fmt: skip
    np.testing.assert_allclose(with_labels.outputs[0].contents.fp32_contents, labelled)
    requests = scrape(server)
    labels = {"scorer": "default", "method": "ModelInfer", "code": "OK"}
    key = ("alignd_reward_scorer_requests_total", frozenset(labels.items()))
    assert requests[key] == 2


def _infer(**fields) -> oip.ModelInferRequest:
    base = {"model_name": "default", "inputs": [tensor("prompt", ["p"]), tensor("response", ["r"])]}
    return oip.ModelInferRequest(**{**base, **fields})


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (_infer(model_name=""), "INVALID_ARGUMENT", "model_name: must name a model"),
        (_infer(model_name="nope"), "NOT_FOUND", "model_name: no model 'nope'"),
        (_infer(model_version="7"), "NOT_FOUND", "model_version: model 'default' has version 1"),
        (_infer(inputs=[tensor("prompt", ["p"])]), "INVALID_ARGUMENT", "the 'response' input"),
        (
            _infer(inputs=[tensor("prompt", ["p"]), tensor("answer", ["r"])]),
            "INVALID_ARGUMENT",
            r"inputs\[1\].name: 'answer' is not one of prompt, response, label",
        ),
        (
            _infer(inputs=[tensor("prompt", ["p"]), tensor("prompt", ["p"])]),
            "INVALID_ARGUMENT",
            "given twice",
        ),
        (
            _infer(inputs=[tensor("prompt", ["p"]), tensor("response", ["r"], "FP32")]),
            "INVALID_ARGUMENT",
            r"inputs\[1\].datatype: 'FP32'; must be BYTES",
        ),
        (
            _infer(inputs=[tensor("prompt", ["p"]), tensor("response", ["r"], shape=[1, 2])]),
            "INVALID_ARGUMENT",
            r"inputs\[1\].shape: \[1, 2\]: must be \[N\] or \[N, 1\]",
        ),
        (
            _infer(inputs=[tensor("prompt", ["p", "q"]), tensor("response", ["r"])]),
            "INVALID_ARGUMENT",
            r"inputs\[1\].shape: 1 items, the other inputs 2",
        ),
        (
            _infer(inputs=[tensor("prompt", ["p"], shape=[2]), tensor("response", ["r"])]),
            "INVALID_ARGUMENT",
            r"inputs\[0\]: 1 values for shape \[2\]",
        ),
        (
            _infer(inputs=[tensor("prompt", [""]), tensor("response", ["r"])]),
            "INVALID_ARGUMENT",
            r"inputs\[0\]\[0\]: must not be empty",
        ),
        (
            _infer(inputs=[tensor("prompt", ["p"] * 9), tensor("response", ["r"] * 9)]),
            "INVALID_ARGUMENT",
            "items: 9 items exceed max_batch_size 8",
        ),
        (
            _infer(parameters={"x": oip.InferParameter(bool_param=True)}),
            "INVALID_ARGUMENT",
            r"parameters: none are taken \(got \['x'\]\)",
        ),
        (
            _infer(outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
            "INVALID_ARGUMENT",
            r"outputs\[0\].name: 'logits'; the output is 'score'",
        ),
        (
            _infer(raw_input_contents=[raw(["p"])]),
            "INVALID_ARGUMENT",
            "raw_input_contents: 1 entries for 2 inputs",
        ),
        (
            _infer(raw_input_contents=[b"\x05\x00\x00\x00ab", raw(["r"])]),
            "INVALID_ARGUMENT",
            "contents: not with raw_input_contents",
        ),
    ],
)
def test_bad_inference_requests_are_refused_naming_the_field(stub, request_, code, message):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_)
    assert caught.value.code().name == code
    assert re.search(message, caught.value.details())


def test_raw_bytes_that_do_not_parse_or_decode_are_refused(stub):
    shapes = oip.ModelInferRequest.InferInputTensor
    inputs = [shapes(name="prompt", datatype="BYTES", shape=[1]),
              shapes(name="response", datatype="BYTES", shape=[1])]  # fmt: skip
    for contents, message in (
        ([b"\x05\x00\x00\x00ab", raw(["r"])], "raw_input_contents[0]: an element of 5 bytes"),
        ([b"\x01\x00", raw(["r"])], "raw_input_contents[0]: a length prefix is cut off"),
        ([raw(["p"]), b"\x02\x00\x00\x00\xff\xfe"], "inputs[1][0]: is not UTF-8 text"),
    ):
        request = oip.ModelInferRequest(model_name="default", inputs=inputs,
                                        raw_input_contents=contents)  # fmt: skip
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details()
