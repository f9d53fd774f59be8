"""Test support shared by every test module: tiny random models, fixture and data paths.

Imported as `from support import ...` (a plain module, so nested conftest.py files cannot shadow it)."""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

# No model hub is reachable from CI: fail fast instead of retrying downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from steer_core.models import LanguageModel, wrap
from steer_core.steering import apply

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


TINY_VOCAB = 1024
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A ChatML template of our own: the tiny models speak in turns as the default model does.
TINY_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.cache
def _tiny_tokenizer_json() -> str:
    """A byte-level BPE of `TINY_VOCAB` tokens trained on the fixtures' text (any text encodes: the 256 bytes
    are in it), built here in a few milliseconds so the unit tests need no model files."""
    texts = [line for path in sorted(FIXTURES.rglob("*.jsonl")) for line in path.read_text().splitlines()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=TINY_SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tiny tokenizer with a chat template and the default model's special tokens (`_tiny_tokenizer_json`)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
                                  bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def make_tiny(family: str = "llama", seed: int = 0) -> LanguageModel:
    """A tiny randomly initialized causal LM of `family` with the tiny tokenizer (`tiny_tokenizer`)."""
    tok = tiny_tokenizer()
    vocab = len(tok)
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **_TINY))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **_TINY))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(vocab_size=vocab, **_TINY))
    elif family == "gemma":
        model = GemmaForCausalLM(GemmaConfig(vocab_size=vocab, head_dim=16, **_TINY))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_positions=512,
                                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    elif family == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=4, num_attention_heads=4,
                                                 max_position_embeddings=512))
    else:
        raise ValueError(family)
    return wrap(model.float().eval(), tok, f"tiny-{family}-{seed}")


def residual_after(lm: LanguageModel, batch: dict, layer: int, steering=None) -> torch.Tensor:
    """The residual stream after block `layer` as block `layer + 1` receives it, from one forward of
    `batch` under `steering` (None: unsteered). Read at the next block's input because transformers'
    `output_hidden_states` records block outputs before forward hooks change them."""
    seen = []

    def capture(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = lm.blocks[layer + 1].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            if steering is None:
                lm.model(**batch, use_cache=False)
            else:
                with apply(lm, steering):
                    lm.model(**batch, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


def steering_alone(profile):
    """`profile` at the strength whose uncalibrated steering judged best out of fold at its layer (from the
    build's search): what the method's steering does by itself, where the build shipped strength 0 because
    its calibration alone did as well (one-sided persona samples, which a constant lean answers)."""
    rows = [row for row in profile.metrics["search"] if row["layer"] == profile.layer]
    profile.strength = max(rows, key=lambda row: row["uncalibrated_alignment"])["strength"]
    return profile


class Gate:
    """Holds the engine thread inside its next model call until `open` (a stuck or slow forward)."""

    def __init__(self, lm) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self._handle = lm.model.register_forward_pre_hook(self._wait)

    def _wait(self, *args) -> None:
        self.entered.set()
        assert self.release.wait(60), "the gate was never opened"

    def open(self) -> None:
        self.release.set()
        self._handle.remove()
