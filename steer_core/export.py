"""Export profiles in other servers' formats: llama.cpp control vectors (GGUF) and peft LoRA adapters.

llama.cpp (`--control-vector FILE`) reads tensors named ``direction.N`` from a GGUF file of architecture
``controlvector`` and adds ``direction.N`` to the output of block N (0-based) at every position, prompt
and generated tokens alike; N = 0 is not accepted. Our layer L is also the output of block L, so a
profile at layer L becomes ``direction.L``, scaled by its strength. Only profiles whose displacement is
one vector for every input (DiffMean, COLD-Kernel with the unit kernel) have such a form.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
import tempfile
from pathlib import Path

import gguf
import numpy as np
from safetensors.torch import save as st_save
from torch import Tensor

from steer_core.errors import SteerError
from steer_core.lora import peft_config
from steer_core.methods import get_method
from steer_core.models import hub_id
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


# ---------------------------------------------------------------------------------------------- peft adapters

def peft_files(profile: Profile) -> dict[str, bytes]:
    """A LoRA profile (built here, imported, or from `cold_fd_as_lora`) as peft's adapter folder:
    ``adapter_config.json`` and ``adapter_model.safetensors``, with the profile's strength folded into the
    B factors (peft has no scale knob besides ``lora_alpha``). The config holds only the keys peft's
    `LoraConfig` defines, and names the base model by its hub id where the model is an alias of one
    (`steer_core.models.HUB_IDS`), so that peft loads the folder against the hub model."""
    if profile.method != "lora":
        raise SteerError(f"a {profile.method} profile is not a LoRA adapter; peft export is for lora and "
                         "cold_fd profiles", "format")
    tensors = {k: (profile.strength * v if k.endswith(".lora_B.weight") else v).float().contiguous()
               for k, v in profile.tensors.items()}
    config = peft_config(profile.params["adapter_config"])
    config["inference_mode"] = True
    named = config.get("base_model_name_or_path")
    hub = hub_id(profile.model_name) or (hub_id(named) if isinstance(named, str) else None)
    if hub is not None:
        config["base_model_name_or_path"] = hub
    return {"adapter_config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
            "adapter_model.safetensors": st_save(tensors, metadata={"format": "pt"})}


def peft_archive(profile: Profile, folder: str = "adapter") -> bytes:
    """`peft_files` as a gzipped tar of one folder (fixed mtimes: the same profile gives the same bytes)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in peft_files(profile).items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


_BLOCK_INDEX = re.compile(r"^(?P<blocks>.+)\.(?P<index>\d+)\.(?P<rest>.+)$")


def cold_fd_as_lora(profile: Profile) -> Profile:
    """The parameter update a COLD-FD profile takes one step along, as a LoRA profile: every rank-r factor
    pair ``U V^T`` of blocks ``0..L`` becomes ``lora_B = strength * unit * U``, ``lora_A = V^T`` (alpha = r,
    so peft's scaling is 1). What has no LoRA form is left out: the embedding rows, the norm gains and the
    Linear biases of the update. The adapter changes the weights (every position, every later block), where
    the profile adds ``J(x)`` of the update at layer L's prompt positions: equal to first order only."""
    if profile.method != "cold_fd":
        raise SteerError(f"only cold_fd profiles have a parameter update to export, not {profile.method}",
                         "format")
    coef = float(profile.strength) * float(profile.params["unit_scale"])
    tensors: dict[str, Tensor] = {}
    names: set[str] = set()
    blocks, ranks = "", set()
    for key, u in profile.tensors.items():
        kind, _, rest = key.partition(":")
        path, _, part = rest.rpartition(":")
        if kind != "side" or part != "U":
            continue
        v = profile.tensors.get(f"side:{path}:V")
        match = _BLOCK_INDEX.match(path)
        if v is None or match is None:
            raise SteerError("this cold_fd profile stores uncompressed matrices; build it with a rank to export "
                             "it as a LoRA adapter", "format")
        blocks = match["blocks"]
        names.add(match["rest"].rsplit(".", 1)[-1])
        ranks.add(int(u.shape[1]))
        tensors[f"base_model.model.{path}.lora_A.weight"] = v.float().T.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = (coef * u.float()).contiguous()
    if not tensors:
        raise SteerError("this cold_fd profile has no low-rank matrices to export", "format")
    if len(ranks) != 1:
        raise SteerError(f"this cold_fd profile's factors have several ranks ({sorted(ranks)}); a LoRA adapter "
                         "has one", "format")
    rank = ranks.pop()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": profile.model_name,
              "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted(names), "layers_to_transform": list(range(profile.layer + 1)),
              "layers_pattern": blocks.rsplit(".", 1)[-1], "rank_pattern": {},
              "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}
    return Profile(method="lora", model_name=profile.model_name, model_fingerprint=profile.model_fingerprint,
                   layer=0, positions="all", strength=1.0, tensors=tensors,
                   params={"rank": rank, "alpha": float(rank), "target_modules": sorted(names),
                           "adapter_config": config, "from": {"method": "cold_fd", "layer": profile.layer,
                                                              "strength": profile.strength}},
                   sample_hash=profile.sample_hash)
