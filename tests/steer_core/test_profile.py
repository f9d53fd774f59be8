"""Profile files: bit-exact round trips, corruption and model mismatches are clear errors."""

from __future__ import annotations

import pytest
import torch
from support import make_tiny

from steer_core.errors import ProfileError
from steer_core.profile import Profile


def _profile(lm) -> Profile:
    g = torch.Generator().manual_seed(0)
    return Profile(method="diffmean", model_name=lm.name, model_fingerprint=lm.fingerprint, layer=1,
                   positions="prompt", strength=0.5,
                   tensors={"vector": torch.randn(lm.hidden_size, generator=g),
                            "ids": torch.arange(5), "half": torch.randn(3, 4, generator=g).to(torch.bfloat16)},
                   params={"rank": 4}, sample_hash="abc", metrics={"unsteered": {"alignment": 0.5}})


def test_round_trip_is_bit_exact(tiny_lm, tmp_path):
    original = _profile(tiny_lm)
    loaded = Profile.load(original.save(tmp_path / "p.safetensors"), tiny_lm)
    assert loaded.metadata() == original.metadata()
    assert set(loaded.tensors) == set(original.tensors)
    for name, t in original.tensors.items():
        assert loaded.tensors[name].dtype == t.dtype and torch.equal(loaded.tensors[name], t)


def test_corrupted_file_is_a_clear_error_naming_the_file(tiny_lm, tmp_path):
    path = _profile(tiny_lm).save(tmp_path / "p.safetensors")
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ProfileError, match="not a valid pluristeer profile") as info:
        Profile.load(path)
    assert info.value.field == str(path)
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(ProfileError):
        Profile.load(path)


def test_profile_for_another_model_is_refused(tiny_lm, tmp_path):
    path = _profile(tiny_lm).save(tmp_path / "p.safetensors")
    other = make_tiny("llama", seed=1)
    with pytest.raises(ProfileError, match="built for model"):
        Profile.load(path, other)


def test_nan_tensors_are_never_written(tiny_lm, tmp_path):
    profile = _profile(tiny_lm)
    profile.tensors["vector"][0] = float("nan")
    with pytest.raises(ProfileError, match="NaN"):
        profile.save(tmp_path / "p.safetensors")
    assert list(tmp_path.iterdir()) == []
