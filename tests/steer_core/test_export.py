"""GGUF control-vector export: what llama.cpp reads back from the file."""

from __future__ import annotations

import gguf
import pytest
import torch

from steer_core import Profile, build_profile, intervention
from steer_core.data import make_item
from steer_core.errors import SteerError
from steer_core.export import control_vector_gguf


def read_back(data: bytes, tmp_path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = tmp_path / "cv.gguf"
    path.write_bytes(data)
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}


def vector_profile(method: str, layer: int = 3, **params) -> Profile:
    tensors = {"vector": torch.linspace(-1.0, 2.0, 16)}
    return Profile(method=method, model_name="tiny", model_fingerprint="f", layer=layer, positions="prompt",
                   strength=2.5, tensors=tensors, params=params)


def test_a_diffmean_profile_becomes_its_scaled_vector_at_its_block(tmp_path):
    profile = vector_profile("diffmean", layer=3)
    fields, tensors = read_back(control_vector_gguf(profile), tmp_path)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.layer_count"] == 1 and fields["controlvector.model_hint"] == "tiny"
    assert list(tensors) == ["direction.3"]
    torch.testing.assert_close(tensors["direction.3"], 2.5 * profile.tensors["vector"])


def test_the_file_carries_what_steering_adds(tiny_lm, tmp_path):
    """A built unit-kernel COLD profile: the exported direction is the vector its intervention adds."""
    items = [make_item(f"Question {i}?", ["Yes", "No"], answer=i % 2) for i in range(6)]
    profile = build_profile(tiny_lm, items, "cold_kernel", {"layer": 2, "strength": 0.7})
    _, tensors = read_back(control_vector_gguf(profile), tmp_path)
    torch.testing.assert_close(tensors["direction.2"], intervention(profile, tiny_lm).vector)


@pytest.mark.parametrize("profile", [
    vector_profile("diffmean", layer=0),
    vector_profile("cold_kernel", kernel="linear", unit_scale=1.0),
    Profile(method="odesteer", model_name="tiny", model_fingerprint="f", layer=3, positions="last", strength=1.0,
            tensors={"coef": torch.zeros(4)}),
], ids=["layer-0", "linear-kernel", "odesteer"])
def test_profiles_without_a_control_vector_form_are_refused(profile):
    with pytest.raises(SteerError) as info:
        control_vector_gguf(profile)
    assert info.value.field == "format"
