"""SamplingParams: validated on construction, errors name the field."""
from __future__ import annotations

import dataclasses

import pytest

from engine.errors import EngineError, InvalidRequestError
from engine.sampling_params import SamplingParams


def test_defaults_construct():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed, p.stop, p.ignore_eos) == (
        16, 1.0, 0, 1.0, None, (), False)
    assert not p.greedy
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0).greedy


def test_valid_edge_values_construct():
    p = SamplingParams(max_tokens=1, temperature=0.0, top_k=-1, top_p=1.0, seed=0, stop=("a", "b"),
                       ignore_eos=True)
    assert p.stop == ("a", "b")
    SamplingParams(top_p=1e-6, top_k=1, temperature=100.0, seed=-3)


def test_single_stop_string_becomes_tuple():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    p = SamplingParams(stop="x")
    assert isinstance(p.stop, tuple)
    assert hash(p) == hash(SamplingParams(stop=("x",)))     # usable as plain frozen data
    assert p == SamplingParams(stop=["x"])


def test_frozen():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 3


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=1.5), "max_tokens"),
    (dict(max_tokens="8"), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=None), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(seed="1"), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(stop=""), "stop"),
    (dict(stop=("ok", "")), "stop"),
    (dict(stop=["ok", 3]), "stop"),
])
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert field in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, EngineError)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature="0.7"), "temperature"),
    (dict(temperature=None), "temperature"),
    (dict(top_p="0.9"), "top_p"),
    (dict(stop=None), "stop"),
    (dict(stop=5), "stop"),
])
def test_wrong_types_raise_invalid_request_not_type_error(kwargs, field):
    # A request decoded from JSON can carry any type; it must come back as a
    # request error naming the field, not as an internal TypeError.
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert field in str(info.value)
