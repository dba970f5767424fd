"""The Open Inference Protocol (KServe v2) on the reward service: ``inference.GRPCInferenceService``
beside ``alignd.v1.RewardService``, on the same port and behind the same interceptors (auth,
request ids, metrics, error mapping), scoring with the same scorers and their batchers.

Every scorer is a model of version ``1``: BYTES inputs ``prompt`` and ``response`` (and
optional ``label``, for function scorers) of shape [N] or [N, 1], UTF-8 text; FP32 output
``score`` of shape [N] — what :meth:`RewardServicer.Score` returns for the same items. Values
come either as each input's ``contents.bytes_contents`` or as ``raw_input_contents`` (the
protocol's raw form: each element a 4-byte little-endian length and its bytes); the scores
go back the same way (``contents.fp32_contents`` or ``raw_output_contents``). Parameters are
not taken: any is INVALID_ARGUMENT, as is an unknown input, output, version or data type.
"""

from __future__ import annotations

import struct

import numpy as np
from grpc import aio

from alignd._version import __version__
from alignd.v1 import open_inference_pb2 as oip
from alignd.v1 import open_inference_pb2_grpc as oip_grpc
from alignd_server.common.batching import deadline_of
from alignd_server.common.errors import InvalidArgument, NotFound, Unavailable
from alignd_server.common.tokenization import check_text, max_text_bytes
from alignd_server.reward.scorers import ScoreInput, Scorer

SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
VERSION = "1"
PLATFORM = "alignd_reward"
INPUTS = ("prompt", "response", "label")
OUTPUT = "score"


def decode_bytes(raw: bytes, field: str) -> list[bytes]:
    """The elements of a raw BYTES tensor (each a uint32 little-endian length, then data)."""
    values, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(field, f"a length prefix is cut off at byte {offset}")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidArgument(field, f"an element of {size} bytes runs past the end")
        values.append(raw[offset : offset + size])
        offset += size
    return values


def _count(shape, field: str) -> int:
    dims = list(shape)
    if len(dims) == 1 or (len(dims) == 2 and dims[1] == 1):
        if dims[0] < 0:
            raise InvalidArgument(field, f"{dims} has a negative dimension")
        return int(dims[0])
    raise InvalidArgument(field, f"{dims}: must be [N] or [N, 1]")


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """The protocol's six RPCs over a :class:`~alignd_server.reward.servicer.RewardServicer`'s
    scorers (it loads them; this service only reads them)."""

    name = SERVICE

    def __init__(self, reward) -> None:
        self.reward = reward

    def register(self, server: aio.Server) -> None:
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(self, server)

    async def start(self) -> None:
        """Nothing to load: the reward service's scorers serve both."""

    async def stop(self) -> None:
        """Nothing to release."""

    def _model(self, name: str, version: str, field: str) -> Scorer:
        if not name:
            raise InvalidArgument(field, "must name a model (one of the reward scorers)")
        scorers = self.reward.scorers
        if not scorers:
            raise Unavailable("the reward scorers are still loading")
        if name not in scorers:
            raise NotFound(f"{field}: no model {name!r}; this server has {', '.join(scorers)}")
        if version not in ("", VERSION):
            raise NotFound(f"{field.replace('name', 'version')}: model {name!r} has version "
                           f"{VERSION} only, not {version!r}")  # fmt: skip
        return scorers[name]

    async def ServerLive(self, request, context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=bool(self.reward.scorers))

    async def ModelReady(self, request, context) -> oip.ModelReadyResponse:
        self._model(request.name, request.version, "name")
        return oip.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="alignd", version=__version__, extensions=[])

    async def ModelMetadata(self, request, context) -> oip.ModelMetadataResponse:
        self._model(request.name, request.version, "name")
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=request.name, versions=[VERSION], platform=PLATFORM,
            inputs=[tensor(name=n, datatype="BYTES", shape=[-1]) for n in INPUTS],
            outputs=[tensor(name=OUTPUT, datatype="FP32", shape=[-1])],
        )  # fmt: skip

    def _columns(self, request: oip.ModelInferRequest) -> tuple[dict[str, list[bytes]], int]:
        """Each input's elements by name, and the batch's item count."""
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgument("raw_input_contents", f"{len(raw)} entries for "
                                  f"{len(request.inputs)} inputs")  # fmt: skip
        columns: dict[str, list[bytes]] = {}
        count = None
        for i, tensor in enumerate(request.inputs):
            field = f"inputs[{i}]"
            if tensor.name not in INPUTS:
                raise InvalidArgument(f"{field}.name", f"{tensor.name!r} is not one of "
                                      f"{', '.join(INPUTS)}")  # fmt: skip
            if tensor.name in columns:
                raise InvalidArgument(f"{field}.name", f"{tensor.name!r} is given twice")
            if tensor.datatype != "BYTES":
                raise InvalidArgument(f"{field}.datatype", f"{tensor.datatype!r}; must be BYTES")
            if tensor.parameters:
                raise InvalidArgument(f"{field}.parameters", "none are taken")
            size = _count(tensor.shape, f"{field}.shape")
            if raw:
                if tensor.HasField("contents"):
                    raise InvalidArgument(f"{field}.contents", "not with raw_input_contents")
                values = decode_bytes(raw[i], f"raw_input_contents[{i}]")
            else:
                values = list(tensor.contents.bytes_contents)
            if len(values) != size:
                raise InvalidArgument(field, f"{len(values)} values for shape {list(tensor.shape)}")
            if count is not None and size != count:
                raise InvalidArgument(f"{field}.shape", f"{size} items, the other inputs {count}")
            count = size
            columns[tensor.name] = values
        for name in ("prompt", "response"):
            if name not in columns:
                raise InvalidArgument("inputs", f"the {name!r} input is required")
        return columns, count or 0

    async def ModelInfer(self, request: oip.ModelInferRequest, context) -> oip.ModelInferResponse:
        scorer = self._model(request.model_name, request.model_version, "model_name")
        if request.parameters:
            given = sorted(request.parameters)
            raise InvalidArgument("parameters", f"none are taken (got {given})")
        for j, wanted in enumerate(request.outputs):
            if wanted.name != OUTPUT:
                raise InvalidArgument(f"outputs[{j}].name", f"{wanted.name!r}; the output is "
                                      f"{OUTPUT!r}")  # fmt: skip
            if wanted.parameters:
                raise InvalidArgument(f"outputs[{j}].parameters", "none are taken")
        columns, count = self._columns(request)
        with self.reward.measured(scorer, "ModelInfer", count):
            self.reward.check_count(count)
            scorer.check_capacity(count)
            limit = max_text_bytes(scorer.max_length)
            field = {n: f"inputs[{i}]" for i, n in enumerate(t.name for t in request.inputs)}

            def text(name: str, index: int) -> str:
                where = f"{field[name]}[{index}]"
                try:
                    value = columns[name][index].decode("utf-8")
                except UnicodeDecodeError as err:
                    raise InvalidArgument(where, f"is not UTF-8 text: {err}") from None
                return check_text(value, where, limit)

            inputs = []
            for k in range(count):
                prompt = text("prompt", k)
                if not prompt:
                    raise InvalidArgument(f"{field['prompt']}[{k}]", "must not be empty")
                label = text("label", k) if "label" in columns else None
                inputs.append(ScoreInput(prompt, text("response", k), label,
                                         f"{field['prompt']}[{k}]",
                                         f"{field['response']}[{k}]"))  # fmt: skip
            scores = await scorer.score(inputs, deadline_of(context))
        output = oip.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype="FP32",
                                                          shape=[count])  # fmt: skip
        response = oip.ModelInferResponse(model_name=scorer.name, model_version=VERSION,
                                          id=request.id)  # fmt: skip
        if request.raw_input_contents:
            response.raw_output_contents.append(np.asarray(scores, "<f4").tobytes())
        else:
            output.contents.fp32_contents.extend(scores.tolist())
        response.outputs.append(output)
        return response
