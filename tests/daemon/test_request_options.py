"""Request options parsed once (issue 13): ``params.RequestOptions.build`` types and merges,
the load options and the runner's sampling options are read from its typed fields."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from corral.daemon.api.errors import http_status
from corral.daemon.errors import CorralError
from corral.daemon.model_inputs import runner_options
from corral.daemon.params import KNOWN_PARAMS, RequestOptions, type_param
from corral.runner.protocol import SamplingOptions


def test_one_field_per_known_parameter_and_every_sampling_option_among_them():
    assert set(RequestOptions.__struct_fields__) == KNOWN_PARAMS
    assert set(SamplingOptions.__struct_fields__) <= KNOWN_PARAMS


def _old_sampling(merged: dict[str, Any]) -> SamplingOptions:
    """What the daemon sent before: the merged dict converted leniently (the removed
    ``SamplingOptions.from_ollama``)."""
    return msgspec.convert(merged, SamplingOptions, strict=False)


# (Modelfile parameters, request options)
CASES = [
    (None, None),
    ({}, {"temperature": 0}),
    ({"temperature": 0.1, "stop": ["<|im_end|>"]}, {"top_k": 7, "seed": 3.9, "not_an_option": 1}),
    ({"temperature": 0.1, "stop": ["<|im_end|>"]}, {"temperature": 0.5, "stop": ["END"]}),
    ({"num_ctx": 4096, "num_predict": 64}, {"num_predict": 5.0, "mirostat": 1, "stop": []}),
    (
        {"repeat_last_n": -1, "top_p": 1},
        {
            "min_p": 0.05,
            "typical_p": 0.7,
            "num_keep": 0,
            "repeat_penalty": 1.1,
            "presence_penalty": -0.5,
            "frequency_penalty": 2,
            "num_gpu": 0,
            "seed": None,
        },
    ),
    ({"seed": 42}, {"seed": -1, "num_predict": -2, "use_mmap": False, "numa": True}),
]


@pytest.mark.parametrize(("params", "options"), CASES)
def test_sampling_options_equal_what_the_dict_path_gave(params, options):
    # the old merge_options: known Modelfile parameters <- request options typed one by one
    merged = {k: v for k, v in (params or {}).items() if k in KNOWN_PARAMS}
    merged.update(
        {
            k: type_param(k, v)
            for k, v in (options or {}).items()
            if k in KNOWN_PARAMS and v is not None
        }
    )
    assert RequestOptions.build(params, options).sampling() == _old_sampling(merged)


def test_a_request_option_overrides_the_modelfile_parameter():
    o = RequestOptions.build(
        {"temperature": 0.1, "num_ctx": 8192, "stop": ["a"]}, {"temperature": 0.7, "stop": ["b"]}
    )
    assert (o.temperature, o.num_ctx, o.stop) == (0.7, 8192, ("b",))
    # a null request option leaves the Modelfile's value (Go: a JSON null sets nothing)
    assert RequestOptions.build({"top_k": 5}, {"top_k": None}).top_k == 5


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"top_k": "many"}, 'option "top_k" must be of type integer'),
        ({"num_ctx": "4096"}, 'option "num_ctx" must be of type integer'),
        ({"num_ctx": True}, 'option "num_ctx" must be of type integer'),
        ({"temperature": "hot"}, 'option "temperature" must be of type float32'),
        ({"use_mmap": "yes"}, 'option "use_mmap" must be of type boolean'),
        ({"use_mmap": "true"}, 'option "use_mmap" must be of type boolean'),
        ({"use_mmap": 1}, 'option "use_mmap" must be of type boolean'),  # Go: no number for a bool
        ({"numa": 0}, 'option "numa" must be of type boolean'),
        ({"penalize_newline": 1.0}, 'option "penalize_newline" must be of type boolean'),
        ({"stop": "x"}, 'option "stop" must be of type array'),
        ({"stop": [1]}, 'option "stop" must be of type array'),
        ({"num_predict": 1e30}, 'option "num_predict" is out of range: 1e+30'),
    ],
)
def test_a_wrong_request_option_is_one_400(options, error):
    with pytest.raises(CorralError) as ei:
        RequestOptions.build({"num_ctx": 2048}, options)
    assert (http_status(ei.value), ei.value.message) == (400, error)


def test_a_stored_parameter_that_does_not_type_is_ours_500():
    with pytest.raises(CorralError) as ei:
        RequestOptions.build({"temperature": "hot"}, None)
    assert (http_status(ei.value), ei.value.message) == (
        500,
        'model parameter: option "temperature" must be of type float32',
    )


def test_load_options_are_read_from_the_typed_value():
    o = RequestOptions.build({"num_ctx": 8192, "num_gpu": 10}, {"num_batch": 64.0, "num_gpu": 0})
    r = runner_options(o, default_ctx=(4096, True), kv_cache_type="q8_0", flash_attention=True)
    assert (r.num_ctx, r.num_ctx_auto, r.num_batch, r.num_batch_auto, r.num_gpu) == (
        8192,
        False,
        64,
        False,
        0,
    )
    assert (r.kv_cache_type, r.flash_attention) == ("q8_0", True)
