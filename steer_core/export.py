"""Export a constant-vector profile as a llama.cpp control vector (GGUF).

llama.cpp (`--control-vector FILE`) reads tensors named ``direction.N`` from a GGUF file of architecture
``controlvector`` and adds ``direction.N`` to the output of block N (0-based) at every position, prompt
and generated tokens alike; N = 0 is not accepted. Our layer L is also the output of block L, so a
profile at layer L becomes ``direction.L``, scaled by its strength. Only profiles whose displacement is
one vector for every input (DiffMean, COLD-Kernel with the unit kernel) have such a form.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import numpy as np

from steer_core.errors import SteerError
from steer_core.methods import get_method
from steer_core.profile import Profile

CONTROL_VECTOR_ARCH = "controlvector"


def control_vector_gguf(profile: Profile) -> bytes:
    """The profile as the bytes of a llama.cpp control-vector GGUF file; `SteerError` (field ``format``)
    for profiles that are not one constant vector or that steer block 0."""
    method = get_method(profile.method)
    vector = method.constant_vector(profile) if method.constant_vector is not None else None
    if vector is None:
        raise SteerError(f"a {profile.method} profile's displacement depends on the input, so it has no "
                         "control-vector form; GGUF export is for constant-vector profiles (diffmean, "
                         "cold_kernel with the unit kernel)", "format")
    if profile.layer < 1:
        raise SteerError("llama.cpp control vectors start at block 1's output; this profile steers layer 0",
                         "format")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "control_vector.gguf"
        writer = gguf.GGUFWriter(path, arch=CONTROL_VECTOR_ARCH)
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", profile.model_name)
        writer.add_uint32(f"{CONTROL_VECTOR_ARCH}.layer_count", 1)
        writer.add_tensor(f"direction.{profile.layer}", vector.detach().cpu().numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()
