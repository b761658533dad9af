"""The loading policy: one grammar for model ids, one rule for device and dtype, one tokenizer
loader, used alike by the command line, the batch actors and the service."""

import json

import pytest
import torch

from consistory.errors import InputError, UsageError
from consistory.loading import (
    load_pipeline,
    load_tokenizer,
    model_id,
    parse_preset,
    resolve_device,
    resolve_dtype,
    resolve_model,
)


@pytest.mark.parametrize("given, expected", [
    ("tiny", ("tiny", 0)),
    ("preset:tiny", ("tiny", 0)),
    ("preset:small:3", ("small", 3)),
    ("preset:full:0", ("full", 0)),
    ("org/name", None),
    ("/some/directory", None),
])
def test_one_grammar_for_presets(given, expected):
    assert parse_preset(given) == expected


@pytest.mark.parametrize("bad", ["preset:", "preset:huge", "preset:tiny:x", "preset:tiny:1:2", "preset:tiny:-1",
                                 "preset:tiny:\u00b2", "preset:tiny:" + "9" * 40])
def test_a_malformed_preset_id_says_how_to_write_one(bad):
    with pytest.raises(InputError, match="preset:NAME:SEED"):
        parse_preset(bad)


def test_the_command_line_reports_a_malformed_preset_as_a_usage_error():
    with pytest.raises(UsageError, match="preset:NAME"):
        resolve_model("preset:huge")


def test_model_ids_are_recorded_in_full():
    assert model_id("tiny") == model_id("preset:tiny") == "preset:tiny:0"
    assert model_id("org/name") == "org/name"


def test_device_and_dtype_rules():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16  # the method's published precision
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(InputError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_asking_for_cuda_without_it_is_refused():
    with pytest.raises(InputError, match="CUDA is not available"):
        resolve_device("cuda")


def test_every_form_of_a_preset_loads_the_same_model():
    short, full = load_pipeline("tiny", "cpu"), load_pipeline("preset:tiny:0", "cpu")
    assert short.model_id == full.model_id == "preset:tiny:0"
    assert short.model_fingerprint == full.model_fingerprint
    assert short.dtype == torch.float32
    assert load_pipeline("preset:tiny:1", "cpu").model_fingerprint != full.model_fingerprint


def test_tokenizers_of_presets_and_of_unreadable_directories(tmp_path):
    assert load_tokenizer("preset:tiny:0") is not None
    # A directory whose tokenizer files are empty: transformers would build an empty tokenizer,
    # which would make every subject "missing"; the loader says it has none instead.
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    assert load_tokenizer(str(tmp_path)) is None
    assert load_tokenizer(str(tmp_path / "missing")) is None
