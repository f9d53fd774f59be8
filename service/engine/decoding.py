"""Tokens in and out of the engine: request threads' tokenizing (`RequestTokenizer`), sampling a row's next
token, and turning each row's tokens into text chunks that never split a stop string or a character
(`Detokenizer`).

A stop string's prefix at the end of the text is held back until the next token shows it is not one; a
token that ends mid-character (it decodes to U+FFFD) is held back until the character is whole. A stop
token ends the text and is no part of it, nor of the log-probabilities.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from service.engine.batch import Row
from service.engine.types import CHUNK, GenerationResult, TextChunk, TokenLogprob
from steer_core.data import OpinionItem
from steer_core.models import LanguageModel
from steer_core.prompts import prompt_token_ids

# How a finished row ends: its finish reason, and its text (None: all it generated, decoded).
Ending = tuple[str, str | None]


def context_length(lm: LanguageModel) -> int:
    """Tokens the model can attend to (prompt plus generated); capped by a sliding window so that the
    left-padded KV caches of a batch stay aligned."""
    config = lm.model.config.get_text_config(decoder=True) if hasattr(lm.model.config, "get_text_config") \
        else lm.model.config
    n = None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            n = value
            break
    if n is None:
        n = int(min(getattr(lm.tokenizer, "model_max_length", 2048), 1 << 20))
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and 0 < window < n:
        n = window
    return n


def stop_token_ids(lm: LanguageModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (lm.tokenizer.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return frozenset(ids)


# ------------------------------------------------------------------------------------------- request threads

def byte_alphabet(tokenizer: Any) -> dict[str, int] | None:
    """Byte-level BPE's vocabulary alphabet (GPT-2, Llama 3, Qwen, SmolLM): the character each byte is
    written as -> the byte; None for other tokenizers."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ != "ByteLevel" and not hasattr(tokenizer, "byte_decoder"):
        return None
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)}
    shifted = [b for b in range(256) if b not in printable]  # written as chr(256), chr(257), ... in order
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(shifted)}


def piece_bytes(piece: str, alphabet: dict[str, int] | None) -> bytes:
    """A vocabulary entry's bytes: byte-level BPE through its alphabet; SentencePiece's `<0xNN>` byte
    tokens and `▁` spaces; anything else (added tokens) as its text."""
    if alphabet is not None and all(c in alphabet for c in piece):
        return bytes(alphabet[c] for c in piece)
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if byte is not None:
        return bytes([int(byte.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


class RequestTokenizer:
    """Request threads' tokenizing, on their own copy of the model's tokenizer: a fast tokenizer must not
    be used by two threads while one changes its padding settings (the engine's scoring does)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()
        self._alphabet = byte_alphabet(tokenizer)
        self._bytes: dict[int, bytes] = {}

    def chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Prompt token ids for chat `messages` (`role`, `content`), ending where the assistant speaks."""
        with self._lock:
            tok = self._tokenizer
            if tok.chat_template:
                text = tok.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                               add_generation_prompt=True)
                return list(tok.encode(text, add_special_tokens=False))
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return list(tok.encode(text))

    def score_prompt_tokens(self, item: OpinionItem) -> int:
        """Length in tokens of the prompt the answer reader builds for `item`."""
        with self._lock:
            return len(prompt_token_ids(self._tokenizer, item))

    def token_bytes(self, tokens: Sequence[int]) -> list[bytes]:
        """The raw UTF-8 bytes each token stands for (a token may hold part of a character)."""
        with self._lock:
            missing = [t for t in set(tokens) if t not in self._bytes]
            for t, piece in zip(missing, self._tokenizer.convert_ids_to_tokens(missing), strict=True):
                self._bytes[t] = piece_bytes(piece, self._alphabet)
            return [self._bytes[t] for t in tokens]


# ------------------------------------------------------------------------------------------- the engine thread

def sample(logits: Tensor, row: Row) -> int:
    """The row's next token from its logits, by its temperature and top_p, with its own generator."""
    # In float64, from the largest logit down: a tiny temperature then gives 0 and -inf (the argmax),
    # never inf - inf (NaN).
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / row.sampling.temperature, dim=-1)
    if row.sampling.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        before = ordered.cumsum(-1) - ordered  # mass of the more likely tokens
        ordered = ordered.masked_fill(before >= row.sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, ordered)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def token_logprob(log_probs: Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s entry from its step's log-softmax over the vocabulary, with the `k` most likely tokens."""
    values, ids = log_probs.topk(k)
    return TokenLogprob(token=token, logprob=float(log_probs[token]),
                        top=tuple(zip(ids.tolist(), values.tolist(), strict=True)))


def held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may still turn into a stop string or a multi-byte character."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return max(hold, incomplete(text))


def incomplete(text: str) -> int:
    """Characters at the end of `text` that a token ending mid-character left (it decodes to U+FFFD)."""
    return len(text) - len(text.rstrip("\ufffd"))


class Detokenizer:
    """Each row's generated tokens as text: what is safe to send goes to its handle as chunks, with the
    log-probabilities of the tokens whose text a chunk completes."""

    def __init__(self, lm: LanguageModel, stop_ids: frozenset[int]) -> None:
        self.lm = lm
        self.stop_ids = stop_ids

    def add(self, row: Row, token: int, logprob: TokenLogprob | None = None) -> Ending | None:
        """Record `token` (and its `logprob` entry) for `row` and send what text is safe to send; how the row
        ends when this token finished it (None: it goes on)."""
        if token in self.stop_ids and not row.sampling.ignore_eos:
            return "stop", None
        row.generated.append(token)
        text = self.text(row)
        if logprob is not None:
            row.logprobs.append(logprob)
            row.ends.append(len(text) - incomplete(text))
        stops = row.sampling.stop
        if stops:
            hits = [i for i in (text.find(s, max(0, row.sent - len(s))) for s in stops) if i >= 0]
            if hits:
                return "stop", text[:min(hits)]
        if len(row.generated) >= row.max_tokens:
            return "length", text
        self.send(row, text, len(text) - held_back(text, stops))
        return None

    def send(self, row: Row, text: str, upto: int, final: bool = False) -> None:
        """Send `text[row.sent:upto]` with the log-probabilities of the tokens whose text it completes; the
        `final` chunk also takes a token that a stop string cut (its text begins before `upto`)."""
        n = row.logprobs_sent
        while n < len(row.ends) and (row.ends[n] <= upto or final and (row.ends[n - 1] if n else 0) < upto):
            n += 1
        if upto > row.sent or n > row.logprobs_sent:
            row.handle.put(CHUNK, TextChunk(text[row.sent:upto], tuple(row.logprobs[row.logprobs_sent:n])))
            row.sent, row.logprobs_sent = max(row.sent, upto), n

    def text(self, row: Row) -> str:
        # transformers types `decode` for a batch too (list[str]); one sequence of ids decodes to a str.
        return self.lm.tokenizer.decode(row.generated, skip_special_tokens=True,  # type: ignore[return-value]
                                        clean_up_tokenization_spaces=False)

    def result(self, row: Row, reason: str, text: str | None = None) -> GenerationResult:
        """The row's result (`text` None: all it generated), its last text sent first unless it was
        cancelled."""
        if text is None:
            text = self.text(row)
        if reason != "cancelled":
            self.send(row, text, len(text), final=True)
        return GenerationResult(text=text, token_ids=list(row.generated), finish_reason=reason,
                                prompt_tokens=len(row.prompt_ids), completion_tokens=len(row.generated),
                                logprobs=row.logprobs[:row.logprobs_sent]
                                if row.sampling.top_logprobs is not None else None)
