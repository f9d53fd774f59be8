"""Model loading: block discovery, clear errors, the cached default model."""

from __future__ import annotations

import pytest
from support import make_tiny

from steer_core.errors import ModelLoadError
from steer_core.models import load_model


@pytest.mark.parametrize(("family", "path"), [
    ("llama", "model.layers"), ("qwen2", "model.layers"), ("mistral", "model.layers"), ("gemma", "model.layers"),
    ("gpt2", "transformer.h"), ("gpt_neox", "gpt_neox.layers")])
def test_decoder_blocks_are_found_for_each_family(family, path):
    lm = make_tiny(family)
    assert lm.block_path == path and lm.num_layers == 4


def test_fingerprint_tells_weights_apart():
    assert make_tiny("llama", 0).fingerprint == make_tiny("llama", 0).fingerprint
    assert make_tiny("llama", 0).fingerprint != make_tiny("llama", 1).fingerprint


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="not a local path") as info:
        load_model("no-such-org/no-such-model-xyz")
    assert info.value.field == "model"


def test_a_gguf_that_is_not_a_causal_lm_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="bogus.gguf"):
        load_model(str(bogus))


def test_local_directory_round_trip(tmp_path):
    lm = make_tiny("qwen2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert again.fingerprint == lm.fingerprint and again.block_path == "model.layers"


def test_default_model_loads_from_the_cache(default_lm):
    assert default_lm.num_layers == 30 and default_lm.hidden_size == 576
    assert default_lm.tokenizer.chat_template
