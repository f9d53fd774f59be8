"""LoRA profiles: a peft LoRA adapter trained on the sample, served per row as a low-rank delta.

The adapter is a peft `LoraConfig` on the model's attention projections (peft's own default targets for
the model type; every Linear of a block for types peft does not know) in blocks ``layer..n-1`` (by default
the top quarter, `first_block`: training then runs the frozen blocks below once rather than once per
step), trained with the loss module COLD-Steer uses (`steer_core.losses`: ``ce`` to the target
distribution, ``dpo``, ``sft``), full batch with Adam in batches of items of like prompt lengths, from a
seeded initialization: the same sample gives the same adapter.

Choice: rank, training steps and learning rate not given in the params are chosen by the build's
cross-validation (`grid`: every combination of `RANKS`, `STEPS` and `LRS`, each trained on the folds and
judged out of fold like every other method's settings), together with the strength, a multiplier of the
adapter's delta (1 = as trained) from `STRENGTHS`; the no-harm rule applies as everywhere (strength 0 when
no setting beats the calibrated unsteered model). The training lengths of one (rank, lr) are checkpoints
of one run (`fit_grid`), so the grid costs one training per (rank, lr). Positions: ``all`` only (an
adapter changes every token's computation, prompt and generated alike).

Storage: the profile's tensors are peft's on-disk state dict (``base_model.model.<module>.lora_A.weight``
(r, in) and ``...lora_B.weight`` (out, r)) and its params hold the ``adapter_config.json`` content, so the
artifact is a peft adapter (`peft_files` writes the folder). Serving never merges weights: the steering
hooks add ``s_i * (x A_i^T) B_i^T`` to each adapted module's output for the rows that carry an adapter
(`steer_core.steering.LowRankRows`), so rows with different adapters, steering profiles, blends and
none share one batch.

Training injects peft's LoRA layers into the model for the duration of the fit and takes them out
again (the caller owns the model: a build runs on a worker, never beside a serving engine).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from steer_core.blocks import last_logits_from
from steer_core.data import OpinionItem
from steer_core.errors import SteerError
from steer_core.losses import item_losses
from steer_core.method_names import METHOD_TABLE
from steer_core.method_params import LORA_MAX_RANK, LORA_MAX_STEPS, check_lora_params
from steer_core.method_spec import Method
from steer_core.models import LanguageModel, ModelLayout, model_names
from steer_core.profile import Profile
from steer_core.prompts import block_batches

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer
    from typing_extensions import TypeIs

# What a fit uses for a hyperparameter left to the search when it is called outside a build.
DEFAULT_RANK = 4
DEFAULT_STEPS = 12
DEFAULT_LR = 1e-2
# The params' check (``rank``, ``alpha``, ``steps``, ``lr``, ``loss``, ``target_modules``) and its limits live
# in the torch-free `steer_core.method_params` (the service checks a build request by them); named here as
# before.
check_params = check_lora_params
MAX_RANK = LORA_MAX_RANK
MAX_STEPS = LORA_MAX_STEPS
# The build's search over what the params leave open. Sized for CPU: each (rank, lr) pair is one more
# training run per fold (a step of the top quarter on 20 items of the default model: ~3.7 CPU s here),
# the training lengths are checkpoints of one run, and rank and lr are left out of the search (one value
# each): Adam's steps move each weight by about lr, so steps x strength already span what a second lr
# would add, and on OpinionsQA a search over ranks {2, 8} of the upper half did no better held out than
# rank 4 of the top quarter at a third of the build time (README, "LoRA profiles").
RANKS = (DEFAULT_RANK,)
STEPS = (4, 8)
LRS = (2e-2,)
TRAIN_BATCH = 8  # items per forward and backward (cut from the items sorted by prompt length)
# The delta as trained times these.
STRENGTHS = [0.5, 1.0, 1.5]
ADAPTER_NAME = "pluristeer"
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------- targets

def _linear(module: nn.Module) -> TypeIs[nn.Linear | Conv1D]:
    return isinstance(module, nn.Linear | Conv1D)


def target_names(lm: LanguageModel) -> list[str]:
    """Leaf names of the modules an adapter targets: peft's default for this model type, else every Linear
    of a decoder block."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    block = lm.blocks[0]
    linear = {name.rsplit(".", 1)[-1] for name, m in block.named_modules() if name and _linear(m)}
    known = DEFAULTS.get(getattr(lm.model.config, "model_type", ""), [])
    chosen = [n for n in known if n in linear]
    return chosen or sorted(linear)


def target_modules(lm: LanguageModel, layer: int, names: Sequence[str]) -> dict[str, nn.Linear | Conv1D]:
    """Module path -> module of every Linear named in `names` in blocks ``layer..n-1``."""
    out: dict[str, nn.Linear | Conv1D] = {}
    for j in range(layer, lm.num_layers):
        for name, module in lm.blocks[j].named_modules():
            if name and _linear(module) and name.rsplit(".", 1)[-1] in names:
                out[f"{lm.block_path}.{j}.{name}"] = module
    return out


def lora_config(lm: LanguageModel, layer: int, rank: int, alpha: float, names: Sequence[str]) -> Any:
    """The peft `LoraConfig` of an adapter on `names` in blocks ``layer..n-1``."""
    from peft import LoraConfig

    extra: dict[str, Any] = {}
    if layer > 0:
        extra = {"layers_to_transform": list(range(layer, lm.num_layers)),
                 "layers_pattern": lm.block_path.rsplit(".", 1)[-1]}
    fan_in_fan_out = any(isinstance(m, Conv1D) for m in target_modules(lm, layer, names).values())
    # peft annotates `lora_alpha` as int, but uses it as a float scale (alpha / r); a float alpha is valid.
    return LoraConfig(r=rank, lora_alpha=alpha,  # type: ignore[arg-type]
                      lora_dropout=0.0, target_modules=list(names), bias="none",
                      task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=lm.name,
                      inference_mode=True, **extra)


def config_dict(config: Any) -> dict[str, Any]:
    """`adapter_config.json`'s content (what `LoraConfig.save_pretrained` writes)."""
    out = config.to_dict()
    for key, value in out.items():
        if isinstance(value, set):
            out[key] = sorted(value)
    return json.loads(json.dumps(out, default=str))


# ---------------------------------------------------------------------------------------------- training

def _inject(lm: LanguageModel, config: Any) -> list[tuple[nn.Module, str, LoraLayer]]:
    """peft's LoRA layers in place of the targeted modules; returns (parent, name, original) to restore."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    inject_adapter_in_model(config, lm.model, adapter_name=ADAPTER_NAME)
    swapped = []
    for path, module in list(lm.model.named_modules()):
        if isinstance(module, LoraLayer):
            parent_path, _, name = path.rpartition(".")
            swapped.append((lm.model.get_submodule(parent_path), name, module))
    return swapped


def _remove(lm: LanguageModel, swapped: list[tuple[nn.Module, str, LoraLayer]]) -> None:
    for parent, name, layer in swapped:
        setattr(parent, name, layer.get_base_layer())
    lm.model.__dict__.pop("peft_config", None)  # inject_adapter_in_model leaves its config on the model


def _factor_weights(layer: LoraLayer) -> tuple[Tensor, Tensor]:
    """The A and B weights of this project's adapter in an injected peft LoRA layer."""
    a, b = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
    if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear):
        raise TypeError(f"peft's LoRA factors are {type(a).__name__} and {type(b).__name__}, not Linear")
    return a.weight, b.weight


def train_adapter(lm: LanguageModel, items: Sequence[OpinionItem], layer: int, params: dict[str, Any],
                  seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Any], list[float]]:
    """Train one adapter on `items`; returns (peft state dict, adapter config dict, loss per step).

    The model is unchanged afterwards (its modules and their `requires_grad` flags restored)."""
    params = resolved(params)
    states, config, losses = train_checkpoints(lm, items, layer, params, [params["steps"]], seed)
    return states[params["steps"]], config, losses


def train_checkpoints(lm: LanguageModel, items: Sequence[OpinionItem], layer: int, params: dict[str, Any],
                      checkpoints: Sequence[int], seed: int = 0
                      ) -> tuple[dict[int, dict[str, Tensor]], dict[str, Any], list[float]]:
    """Train one adapter for ``max(checkpoints)`` steps (`params`' own ``steps`` is not read); returns its
    peft state dict after each checkpoint's number of steps (the same state a run of that many steps
    ends with: full batch, no schedule), the adapter config dict and the loss per step."""
    names = params["target_modules"] or target_names(lm)
    config = lora_config(lm, layer, params["rank"], params["alpha"], names)
    all_params = list(lm.model.parameters())
    saved = [p.requires_grad for p in all_params]
    with torch.random.fork_rng(devices=[]):  # peft initializes lora_A from the global generator
        torch.manual_seed(seed)
        swapped = _inject(lm, config)
    states: dict[int, dict[str, Tensor]] = {}
    try:
        for p in all_params:
            p.requires_grad_(False)
        trainable = []
        for _, _, wrapped in swapped:
            for weight in _factor_weights(wrapped):
                weight.data = weight.data.to(device=lm.device, dtype=torch.float32)
                weight.requires_grad_(True)
                trainable.append(weight)
        paths = [_path_of(lm, parent, name) for parent, name, _ in swapped]
        optimizer = torch.optim.Adam(trainable, lr=params["lr"])
        # Chunks of like lengths (little padding to run forward and back); in a build, the folds' runs take
        # their items' block inputs from the full run's (`reuse_block_inputs`).
        runs = list(block_batches(lm, items, layer, TRAIN_BATCH, keep=True))
        chunks = [[items[i] for i in run.indices] for run in runs]
        inputs = [(run.args, run.kwargs) for run in runs]
        losses: list[float] = []
        with torch.enable_grad():
            for step in range(1, max(checkpoints) + 1):
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for chunk, (args, kwargs) in zip(chunks, inputs, strict=True):
                    logits = last_logits_from(lm, layer, args, kwargs)
                    loss = item_losses(lm, logits, chunk, params["loss"]).sum() / len(items)
                    loss.backward()
                    total += float(loss.detach())
                optimizer.step()
                losses.append(total)
                if step in checkpoints:
                    states[step] = {}
                    for path, (_, _, wrapped) in zip(paths, swapped, strict=True):
                        a, b = _factor_weights(wrapped)
                        states[step][f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.detach().float().cpu().clone()
                        states[step][f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.detach().float().cpu().clone()
    finally:
        _remove(lm, swapped)
        for p, flag in zip(all_params, saved, strict=True):
            p.requires_grad_(flag)
    return states, config_dict(config), losses


def _path_of(lm: LanguageModel, parent: nn.Module, name: str) -> str:
    for path, module in lm.model.named_modules():
        if module is parent:
            return f"{path}.{name}" if path else name
    raise RuntimeError(f"module {name!r} is not in the model")


# ---------------------------------------------------------------------------------------------- the method

def first_block(lm: LanguageModel) -> int:
    """The build's first adapted block: the top quarter of the blocks (at least the last one)."""
    return lm.num_layers - max(1, lm.num_layers // 4)


def resolved(params: dict[str, Any]) -> dict[str, Any]:
    """Checked params with what the search would choose set to the defaults (a fit outside a build)."""
    rank = params["rank"] or DEFAULT_RANK
    return {**params, "rank": rank, "alpha": params["alpha"] or float(2 * rank),
            "steps": params["steps"] or DEFAULT_STEPS, "lr": params["lr"] or DEFAULT_LR}


def grid(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The settings a build compares: every combination of rank, lr and steps the params leave open."""
    ranks = [params["rank"]] if params["rank"] is not None else list(RANKS)
    lrs = [params["lr"]] if params["lr"] is not None else list(LRS)
    steps = [params["steps"]] if params["steps"] is not None else list(STEPS)
    return [resolved({**params, "rank": r, "lr": lr, "steps": n}) for r in ranks for lr in lrs for n in steps]


def fit(lm: LanguageModel, items: Sequence[OpinionItem], layers: Sequence[int], params: dict[str, Any],
        positions: str) -> dict[int, Profile]:
    """One adapter per candidate first block (each trained from the same seed)."""
    return fit_grid(lm, items, layers, [resolved(params)], positions)[0]


def fit_grid(lm: LanguageModel, items: Sequence[OpinionItem], layers: Sequence[int],
             settings: Sequence[dict[str, Any]], positions: str) -> list[dict[int, Profile]]:
    """{layer: adapter} for each setting; settings that differ only in ``steps`` share one training run
    (each its checkpoint)."""
    if positions != "all":
        raise SteerError("lora adapters change every position's computation: positions must be 'all'", "positions")
    for params in settings:
        if params["target_modules"] is not None:
            for layer in layers:
                if not target_modules(lm, lm.check_layer(layer, "params.layer"), params["target_modules"]):
                    raise SteerError("no Linear module of the model's blocks has one of these names",
                                     "params.target_modules")
    runs: dict[str, list[int]] = {}  # a setting without its steps -> the settings it trains
    for v, params in enumerate(settings):
        runs.setdefault(json.dumps({**params, "steps": None}, sort_keys=True), []).append(v)
    out: list[dict[int, Profile]] = [{} for _ in settings]
    for members in runs.values():
        base = settings[members[0]]
        for layer in layers:
            lm.check_layer(layer, "params.layer")
            states, config, losses = train_checkpoints(lm, items, layer, base,
                                                       sorted({settings[v]["steps"] for v in members}))
            for v in members:
                params, steps = settings[v], settings[v]["steps"]
                state = states[steps]
                if not all(torch.isfinite(t).all() for t in state.values()) or not math.isfinite(losses[steps - 1]):
                    raise SteerError("training diverged (NaN or inf); lower params.lr", "params.lr")
                out[v][layer] = Profile(
                    method="lora", model_name=lm.name, model_fingerprint=lm.fingerprint, layer=layer,
                    positions=positions, strength=1.0, tensors=state,
                    params={**params, "target_modules": config["target_modules"], "adapter_config": config,
                            "train_loss": losses[steps - 1], "train_loss_start": losses[0]})
    return out


def factors(profile: Profile) -> dict[str, tuple[Tensor, Tensor]]:
    """Module path -> (A (r, in), B (out, r) times the adapter's scaling ``alpha / r``) of a LoRA profile."""
    config = profile.params["adapter_config"]
    scaling = float(config["lora_alpha"]) / float(config["r"])
    if config.get("use_rslora"):
        scaling = float(config["lora_alpha"]) / math.sqrt(float(config["r"]))
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for key, a in profile.tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        b = profile.tensors[key[:-len("lora_A.weight")] + "lora_B.weight"]
        out[path] = (a, b * scaling)
    return out


@dataclass(frozen=True, eq=False)
class LoraShift:
    """An adapter's per-row delta ``coef * (x A^T) B^T`` on each module in `factors` (the steering hooks
    apply it through `LowRankRows`; it adds nothing at a block's output). `layer` is the first adapted
    block."""

    layer: int
    positions: str
    factors: dict[str, tuple[Tensor, Tensor]]  # module path -> (A (r, in), B (out, r)), scaling folded in
    coef: float = 1.0
    position_local: ClassVar[bool] = True

    def low_rank(self) -> dict[str, tuple[Tensor, Tensor]]:
        if self.coef == 1.0:
            return self.factors
        return {path: (a, self.coef * b) for path, (a, b) in self.factors.items()}

    def displacement(self, hidden: Tensor, ctx: Any, rows: Tensor) -> Tensor:
        raise RuntimeError("a LoRA adapter is applied to module outputs by the steering hooks, not added to "
                           "a block's output")

    @classmethod
    def blend(cls, weighted: Sequence[tuple[LoraShift, float]]) -> LoraShift:
        """One adapter for a weighted mix: the factors of each module concatenated along the rank (each
        part's B scaled by its weight), so the mix's delta is the weighted sum of the parts' deltas."""
        merged: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        for iv, w in weighted:
            for path, (a, b) in iv.low_rank().items():
                parts = merged.setdefault(path, ([], []))
                parts[0].append(a)
                parts[1].append(w * b)
        first = weighted[0][0]
        return cls(layer=min(iv.layer for iv, _ in weighted), positions=first.positions,
                   factors={p: (torch.cat(a), torch.cat(b, dim=1)) for p, (a, b) in merged.items()})


def intervention(profile: Profile, lm: LanguageModel) -> LoraShift:
    modules = dict(lm.model.named_modules())
    fs = factors(profile)
    for path, (a, b) in fs.items():
        module = modules.get(path)
        if module is None or not _linear(module):
            raise SteerError(f"the adapter targets {path!r}, which is not a Linear module of this model", "profile")
        out_f, in_f = _shape(module)
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise SteerError(f"the adapter's factors for {path!r} do not fit its {out_f}x{in_f} weight", "profile")
    return LoraShift(layer=profile.layer, positions=profile.positions, factors=fs, coef=float(profile.strength))


def _shape(module: nn.Linear | Conv1D) -> tuple[int, int]:
    """(out, in) features of a Linear or a GPT-2 Conv1D."""
    w = module.weight
    return (int(w.shape[1]), int(w.shape[0])) if isinstance(module, Conv1D) else (int(w.shape[0]), int(w.shape[1]))


# ---------------------------------------------------------------------------------------------- import

MAX_IMPORT_BYTES = 64 << 20
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
# Bytes per element of the safetensors dtypes a LoRA factor may have (floating point, as the import needs).
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def _not_safetensors(reason: str) -> SteerError:
    return SteerError(f"not a safetensors file: {reason} (only safetensors is accepted: a pickled .bin or "
                      "torch.save file is refused unread; save the adapter with safe_serialization=True)",
                      "adapter_model")


def safetensors_header(data: bytes) -> dict[str, dict[str, Any]]:
    """The tensor entries (name -> dtype, shape, data_offsets) of the safetensors file `data`, checked
    without unpickling or loading anything: an 8-byte little-endian header length N, then N bytes of UTF-8
    JSON object (a ``{`` first; trailing spaces are allowed padding) whose entries are floating-point tensors
    with offsets that tile the rest of the file exactly. Anything else (a pickle, a torch.save zip) is a
    `SteerError` naming ``adapter_model``. This is what tells safetensors from a pickle: a header length's
    first byte may be anything, 0x80 (a pickle's first byte) included."""
    if len(data) < 8:
        raise _not_safetensors(f"{len(data)} bytes, fewer than the 8 of the header length")
    size = int.from_bytes(data[:8], "little")
    if not 2 <= size <= len(data) - 8:
        raise _not_safetensors(f"the first 8 bytes give a header of {size} bytes, but the file has "
                               f"{len(data) - 8} after them")
    raw = data[8:8 + size]
    if raw[:1] != b"{":
        raise _not_safetensors("the header does not start with '{'")

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise ValueError("a key is repeated")
        return out

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _not_safetensors(f"the header is not a JSON object ({exc})") from None
    if not isinstance(header, dict):
        raise _not_safetensors("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _not_safetensors("'__metadata__' must map names to strings")
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _not_safetensors(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _FLOAT_DTYPES:
            raise SteerError(f"tensor {name!r} has dtype {dtype!r}; LoRA factors are floating point "
                             f"({', '.join(_FLOAT_DTYPES)})", "adapter_model")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise _not_safetensors(f"tensor {name!r}: shape must be a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _not_safetensors(f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end")
        if offsets[1] - offsets[0] != math.prod(shape) * _FLOAT_DTYPES[dtype]:
            raise _not_safetensors(f"tensor {name!r}: data_offsets span {offsets[1] - offsets[0]} bytes; a "
                                   f"{dtype} tensor of shape {shape} has {math.prod(shape) * _FLOAT_DTYPES[dtype]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise _not_safetensors(f"tensor {name!r} starts at byte {begin} of the data, not at {end}: the "
                                   "tensors must tile the data without gaps or overlaps")
        end = stop
    if end != len(data) - 8 - size:
        raise _not_safetensors(f"the tensors hold {end} bytes of data; the file has {len(data) - 8 - size} "
                               "after the header")
    return header


@functools.cache
def peft_config_keys() -> frozenset[str]:
    """The keys of ``adapter_config.json`` for a LoRA adapter: the fields of peft's `LoraConfig` that its
    `save_pretrained` writes (`runtime_config` is a field it leaves out)."""
    from peft import LoraConfig

    return frozenset(f.name for f in fields(LoraConfig)) & frozenset(LoraConfig().to_dict())


def peft_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with only the keys peft's `LoraConfig` defines (`peft_config_keys`)."""
    keys = peft_config_keys()
    return {k: v for k, v in config.items() if k in keys}


def imported_profile(config: Any, weights: bytes, base: ModelLayout, max_rank: int = MAX_RANK,
                     max_bytes: int = MAX_IMPORT_BYTES, aliases: Sequence[str] = ()) -> Profile:
    """A tenant's own peft LoRA adapter (``adapter_config.json`` content and ``adapter_model.safetensors``
    bytes) as a LoRA profile for the model `base` describes (plain data: no model is needed), checked:
    safetensors only, recognized by parsing its header (`safetensors_header`: anything else, a pickle
    included, is refused unread), a plain LoRA (no DoRA, no saved modules, no per-module rank patterns) for
    this base model (`base.name` or one of `aliases`, or the hub id either is an alias of: `model_names`),
    every tensor a (A, B) pair of a Linear module of a decoder block with that module's shapes, rank and
    size within the caps. The stored config keeps only the keys peft's `LoraConfig` defines. Errors name
    the field: ``adapter_config.<key>`` or ``adapter_model``."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    if len(weights) > max_bytes:
        raise SteerError(f"the adapter has {len(weights)} bytes; at most {max_bytes} are accepted", "adapter_model")
    safetensors_header(weights)
    if not isinstance(config, dict):
        raise SteerError("must be the JSON object of adapter_config.json", "adapter_config")

    def bad(key: str, message: str) -> SteerError:
        return SteerError(message, f"adapter_config.{key}")

    if config.get("peft_type") != "LORA":
        raise bad("peft_type", "must be 'LORA'")
    made_for = config.get("base_model_name_or_path")
    served = list(dict.fromkeys(n for name in (base.name, *aliases) for n in model_names(name)))
    if made_for not in served:
        raise bad("base_model_name_or_path", f"the adapter was made for {made_for!r}; this server serves "
                  f"{base.name!r}" + (f" ({', '.join(map(repr, served[1:]))})" if served[1:] else ""))
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise bad("r", f"must be an integer in 1..{max_rank}")
    alpha = config.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise bad("lora_alpha", "must be a finite number > 0")
    for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "trainable_token_indices"):
        if config.get(key):
            raise bad(key, "is not supported: only plain LoRA adapters of Linear modules are imported")
    if config.get("bias", "none") != "none":
        raise bad("bias", "must be 'none'")
    try:
        tensors = st_load(weights)
    except (SafetensorError, ValueError) as exc:
        raise SteerError(f"not a safetensors file: {exc}", "adapter_model") from None
    blocks: list[int] = []
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((_A_SUFFIX, _B_SUFFIX)):
            raise SteerError(f"tensor {key!r} is not a LoRA factor ('base_model.model.<module>.lora_A.weight' "
                             "or '.lora_B.weight')", "adapter_model")
        path = key[len(PEFT_PREFIX):-len(_A_SUFFIX)]
        shape = base.linear.get(path)
        block = base.block_of(path)
        if shape is None or block is None:
            raise SteerError(f"tensor {key!r}: {path!r} is not a Linear module of a decoder block of {base.name!r}",
                             "adapter_model")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise SteerError(f"tensor {key!r} must hold finite floating-point numbers", "adapter_model")
        out_f, in_f = shape
        want = (rank, in_f) if key.endswith(_A_SUFFIX) else (out_f, rank)
        if tuple(t.shape) != want:
            raise SteerError(f"tensor {key!r} has shape {tuple(t.shape)}; a rank-{rank} adapter of {path!r} "
                             f"({out_f}x{in_f}) needs {want}", "adapter_model")
        other = key[:-len(_A_SUFFIX)] + (_B_SUFFIX if key.endswith(_A_SUFFIX) else _A_SUFFIX)
        if other not in tensors:
            raise SteerError(f"tensor {key!r} has no {other.rsplit('.', 2)[-2]} partner", "adapter_model")
        blocks.append(block)
        out[key] = t.float().contiguous()
    if not out:
        raise SteerError("the adapter has no tensors", "adapter_model")
    clean = peft_config(config)
    clean.update({"r": rank, "lora_alpha": alpha, "inference_mode": True})
    return Profile(method="lora", model_name=base.name, model_fingerprint=base.fingerprint, layer=min(blocks),
                   positions="all", strength=1.0, tensors=out,
                   params={"rank": rank, "alpha": float(alpha), "target_modules": config.get("target_modules"),
                           "adapter_config": clean, "imported": True})


METHOD = Method(**METHOD_TABLE["lora"].fields(), fit=fit, intervention=intervention,
                strengths=lambda profile, lm: list(STRENGTHS), default_positions="all",
                layers=lambda lm: [first_block(lm)], grid=grid, fit_grid=fit_grid)
