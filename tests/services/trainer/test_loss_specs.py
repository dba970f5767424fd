"""Loss specs agree with the proto, with the loss functions and with the SDK's typed losses.

The spec of a loss is the one place its parameters, defaults and ranges are written; these
tests fail when the proto, a loss function's keyword defaults or ``alignd.losses`` drift from
it.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from alignd import losses as sdk
from alignd.v1 import trainer_pb2
from alignd_server.trainer import convert
from alignd_server.trainer.losses import BY_FIELD, LOSSES, SPECS
from alignd_server.trainer.losses.spec import LossSpec

ONEOF = trainer_pb2.Loss.DESCRIPTOR.oneofs_by_name["kind"]
SPEC_LIST = list(SPECS.values())
SDK_CLASSES = typing.get_args(sdk.Loss)


def message_of(spec: LossSpec):
    return trainer_pb2.Loss.DESCRIPTOR.fields_by_name[spec.field].message_type


def test_every_loss_of_the_proto_has_one_spec() -> None:
    assert sorted(BY_FIELD) == sorted(f.name for f in ONEOF.fields)
    assert len(BY_FIELD) == len(SPECS)
    assert {name: spec.fn for name, spec in SPECS.items()} == LOSSES


@pytest.mark.parametrize("spec", SPEC_LIST, ids=lambda s: s.name)
def test_spec_names_the_fields_of_its_message(spec: LossSpec) -> None:
    fields = message_of(spec).fields_by_name
    names = {p.name for p in spec.params} | ({"temperature"} if spec.temperature else set())
    assert names == set(fields)


@pytest.mark.parametrize("spec", SPEC_LIST, ids=lambda s: s.name)
def test_fields_without_presence_default_to_the_proto_zero(spec: LossSpec) -> None:
    fields = message_of(spec).fields_by_name
    for param in spec.params:
        field = fields[param.name]
        if param.choices:  # an enum: its values, in number order, are the choices
            prefix = field.enum_type.name.upper() + "_"  # VARIANT_SIGMOID, AGGREGATION_...
            values = sorted(field.enum_type.values, key=lambda v: v.number)
            assert [v.number for v in values] == list(range(len(param.choices)))
            assert [v.name.removeprefix(prefix).lower() for v in values] == list(param.choices)
            assert param.default == param.choices[0]
        else:
            assert param.range is not None
            if not field.has_presence:
                assert param.default == 0.0, param.name


@pytest.mark.parametrize("spec", SPEC_LIST, ids=lambda s: s.name)
def test_loss_functions_default_as_their_spec(spec: LossSpec) -> None:
    signature = inspect.signature(spec.fn)
    keywords = {k: p.default for k, p in list(signature.parameters.items())[1:]}
    assert keywords == spec.defaults()


@pytest.mark.parametrize("spec", SPEC_LIST, ids=lambda s: s.name)
def test_spec_refers_to_what_exists(spec: LossSpec) -> None:
    params = {p.name for p in spec.params}
    assert spec.model.kinds <= set(convert.KINDS.values())
    assert all(s.when is None or s.when in params for s in spec.statistics)
    assert spec.replicated is None or spec.replicated in spec.sequence_inputs


@pytest.mark.parametrize("spec", SPEC_LIST, ids=lambda s: s.name)
def test_an_empty_message_means_the_spec_defaults(spec: LossSpec) -> None:
    message = trainer_pb2.Loss(**{spec.field: getattr(trainer_pb2, message_of(spec).name)()})
    assert convert.loss(message) == (spec.name, spec.defaults(), 1.0)


def test_every_spec_has_one_sdk_loss() -> None:
    fields = [cls().to_proto().WhichOneof("kind") for cls in SDK_CLASSES]
    assert sorted(fields) == sorted(BY_FIELD)


@pytest.mark.parametrize("cls", SDK_CLASSES, ids=lambda c: c.__name__)
def test_sdk_losses_have_the_spec_parameters_and_defaults(cls) -> None:
    spec = BY_FIELD[cls().to_proto().WhichOneof("kind")]
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    expected = spec.defaults() | ({"temperature": 1.0} if spec.temperature else {})
    assert defaults == expected
    assert convert.loss(cls().to_proto()) == (spec.name, spec.defaults(), 1.0)
