"""The generation engine: one thread owns the model and every tensor, and runs every request of the process.

Request threads never touch torch. They tokenize (on their own copy of the tokenizer), then hand the engine
a prompt, sampling parameters and a plain-data steering plan (`service.engine.plan.SteeringPlan`: artifact
digests, weights, positions) with `submit` or `score`, and read what comes back from a `GenerationHandle`.

The engine thread resolves plans: it loads each profile through the profile source (the service's profile
cache: LRU, Redis, artifact store), builds its intervention for the served model, composes the blend,
and keeps both in one bounded `InterventionCache`. A plan that cannot steer fails its own request
(`SteeringRejected`) before it takes a batch slot.

Batching is dynamic: when the engine is idle it waits at most `batch_wait_ms` after the first arrival to
fill a batch; while a batch runs, new requests are prefilled between decode steps and concatenated into it
(their KV caches left-padded to a common length), up to `max_batch_size` rows. Every row keeps its own
steering through `SteeringHooks.plan`; a batch with no steered row runs with no hooks at all. A row that
finishes (stop token, stop string, `max_tokens`), is cancelled (client gone), passes its deadline or
fails leaves the batch at the next step; an intervention that raises fails only the rows it steers.

Scoring shares the loop. An idle engine reads score requests flat out through the one answer reader
(`steer_core.prompts.answer_distributions`), `score_batch_size` questions a call. While rows are decoding,
questions ride the decode batch instead: a riding question joins with an empty KV cache and feeds its prompt
one token per decode step, as one more row of the step's forward call, and leaves with its answer
distribution when its last prompt token has run. A forward call's fixed cost (every block's kernels, Python
dispatch) is paid once for streams and riders together, so a rider costs a step only its own row's compute;
riders are added while they cost at most `score_share` of a plain step (measured: a plain step's time for
the number of rows decoding, and each rider's extra time). Each row of a step carries where its own prompt
ends, so a rider's prompt positions are steered as in a whole read. Steering that needs the whole prompt in
one call (`steers_in_chunks` is False: COLD-FD, COLD-Kernel), and a profile with a question lean (it reads
the whole prompt's states, `steer_core.question_lean`), read their questions whole between decode steps,
sized to take `score_share` of the engine's time; decode steps run until they have used the rest. Such a
read also returns each question's lean (`Scored.leans`); the request thread applies the calibrations.

A row that asks for log-probabilities (`SamplingParams.top_logprobs`) gets them from the logits it samples
from, steering applied; the other rows of its batch pay nothing for it.

At most `max_queue` requests wait for the engine; beyond that `submit` and `score` raise `EngineBusy` at
once. `stop` ends every request it has admitted with a result or an error.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.engine.interventions import InterventionCache, ProfileSource
from service.engine.plan import (
    MAX_TOP_LOGPROBS,
    AppliedProfile,
    DeadlineExceeded,
    EngineBusy,
    EngineStopped,
    GenerationFailed,
    PlannedProfile,
    SteeringPlan,
    SteeringRejected,
)
from steer_core.data import OpinionItem
from steer_core.errors import SteerError
from steer_core.models import LanguageModel
from steer_core.prompts import option_log_probs, prompt_token_ids, read_answers
from steer_core.question_lean import QuestionLean
from steer_core.steering import RowSteering, SteeringHooks, steers_in_chunks

__all__ = ["AppliedProfile", "DeadlineExceeded", "EngineBusy", "EngineStopped", "GenerationEngine",
           "GenerationFailed", "GenerationHandle", "GenerationResult", "InterventionCache", "PlannedProfile",
           "ProfileSource", "SamplingParams", "Scored", "SteeringPlan", "SteeringRejected", "TextChunk",
           "TokenLogprob"]

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: `temperature == 0` is greedy; `stop` strings end the text (excluded).

    `top_logprobs` None: no log-probabilities; k: each generated token comes with its log-probability and
    the k most likely tokens at its step (see `TokenLogprob`).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_tokens whatever the model says (benchmarks)
    top_logprobs: int | None = None

    def check(self, max_new_tokens: int) -> None:
        """Raise `SteerError` naming the field when a value is out of range."""
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= max_new_tokens:
            raise SteerError(f"must be an integer in 1..{max_new_tokens}", "max_tokens")
        if not np.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise SteerError("must be a number in 0..2", "temperature")
        if not np.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise SteerError("must be a number in (0, 1]", "top_p")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SteerError("stop strings must be non-empty strings", "stop")
        if self.top_logprobs is not None and (not isinstance(self.top_logprobs, int)
                                              or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise SteerError(f"must be an integer in 0..{MAX_TOP_LOGPROBS}", "top_logprobs")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability, and the most likely tokens at its step (most likely first).

    Read from the model's own logits at that step, steering applied, as a log-softmax over the vocabulary
    before temperature and top_p (OpenAI's convention: greedy decoding picks the first of `top`).
    """

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class TextChunk:
    """New text of one request (a stop string's prefix is held back until it is known not to be one), and,
    when asked for, the log-probabilities of the tokens whose text it completes."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # one of FINISH_REASONS
    prompt_tokens: int
    completion_tokens: int
    # When asked for: the tokens of `text` (a stop string that cuts a token keeps it whole).
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Scored:
    """Answer distributions of a score request, and what steered each item."""

    distributions: list[np.ndarray]
    applied: list[tuple[AppliedProfile, ...]]
    # Per item, per plan entry: the lean its profile's question lean read off the item's prompt (None: the
    # profile has none; its recorded calibration's lean applies).
    leans: list[tuple[float | None, ...]]


_STARTED, _DONE, _CHUNK, _ERROR = "started", "done", "chunk", "error"
_BATCH_SERIALS = itertools.count()


class GenerationHandle:
    """What a request thread holds: the steering the engine applied, text chunks as they come, the final
    result, and `cancel`."""

    def __init__(self, request_id: int, prompt_tokens: int, deadline: float) -> None:
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.deadline = deadline  # time.monotonic() past which the engine drops the request
        self.applied: tuple[AppliedProfile, ...] | None = None  # set once the engine resolved the plan
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None

    def cancel(self) -> None:
        """Ask the engine to drop this request; its batch slot is freed at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _take(self, timeout: float | None) -> tuple[str, Any] | None:
        """The next event, with what it says recorded (applied, result, error); None after `timeout` s."""
        try:
            kind, value = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if kind == _STARTED:
            self.applied = value
        elif kind == _DONE:
            self._result = value
        elif kind == _ERROR:
            self._error = value
        return kind, value

    def next(self, timeout: float | None = None) -> TextChunk | GenerationResult | None:
        """The next text chunk, or the result once the request finished; None when nothing came within
        `timeout` seconds. Raises the request's error (`SteeringRejected`, `GenerationFailed`, ...)."""
        while True:
            if self._error is not None:
                raise self._error
            if self._result is not None:
                return self._result
            event = self._take(timeout)
            if event is None:
                return None
            if event[0] == _CHUNK:
                return event[1]

    def started(self, timeout: float | None = None) -> tuple[AppliedProfile, ...] | None:
        """What the engine applied once it accepted the request's steering; raises what it refused it
        with; None when neither happened within `timeout` seconds."""
        while self.applied is None:
            if self._error is not None:
                raise self._error
            event = self._take(timeout)
            if event is None:
                return None
            if event[0] in (_CHUNK, _DONE):  # a request is started before it produces anything
                raise RuntimeError(f"unexpected {event[0]} event before the request started")
        return self.applied

    def chunks(self, timeout: float | None = None) -> Iterator[TextChunk]:
        """Text chunks as they are generated; ends when the request finishes, raises if it failed.

        `timeout` bounds the wait for each chunk (TimeoutError past it).
        """
        while True:
            item = self.next(timeout)
            if item is None:
                raise TimeoutError("no output from the generation engine in time")
            if isinstance(item, GenerationResult):
                return
            yield item

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the whole generation (`timeout` per chunk) and return it."""
        for _ in self.chunks(timeout):
            pass
        assert self._result is not None
        return self._result

    def _put(self, kind: str, value: Any) -> None:
        self._events.put((kind, value))


@dataclass
class EngineStats:
    """Counters a request thread may read at any time (for /metrics and tests)."""

    active_rows: int = 0  # rows in the running batch
    queued: int = 0  # requests waiting for the engine (generation rows and score requests)
    steps: int = 0  # decode steps run
    prefills: int = 0  # prefill calls run
    tokens: int = 0  # tokens generated
    finished: int = 0  # generation requests finished (any reason, failures included)
    failed: int = 0
    cancelled: int = 0
    expired: int = 0  # requests dropped at their deadline (counted in `failed` too)
    rejected: int = 0  # requests whose steering plan could not be resolved (never admitted)
    largest_batch: int = 0
    steered_steps: int = 0  # forward calls that ran with steering hooks attached
    score_batches: int = 0  # whole scoring reads run (between decode steps, or idle)
    score_rows: int = 0  # questions in the last whole read
    score_riders: int = 0  # questions read riding decode steps (counted as each is read)


@dataclass(eq=False)
class _Row:
    handle: GenerationHandle
    prompt_ids: list[int]
    sampling: SamplingParams
    plan: SteeringPlan | None
    max_tokens: int
    generator: torch.Generator | None
    steering: RowSteering | None = None  # the plan, resolved on the engine thread
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already sent
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when asked for: one per generated token
    ends: list[int] = field(default_factory=list)  # where each of those tokens' text ends in the decoded text
    logprobs_sent: int = 0
    queued: bool = True  # counted in the engine's queue


@dataclass(eq=False)
class _Rider:
    """A question of a score request riding the decode batch: it feeds one prompt token per step."""

    job: _ScoreJob
    index: int  # the item's index in the job
    prompt_ids: list[int]
    steering: RowSteering | None
    fed: int = 0  # prompt tokens already in the KV cache

    def prompt_end(self, width: int) -> int:
        """Where the prompt ends, in a decode call's absolute positions (`width` columns, the token being fed
        in the last)."""
        return width - 1 - self.fed + len(self.prompt_ids)


@dataclass(eq=False)
class _Batch:
    """The running batch: rows (generations and riding questions), their shared KV cache (left-padded),
    attention mask and next inputs."""

    rows: list[_Row | _Rider]
    cache: Any  # a transformers Cache
    mask: Tensor  # (B, T) 1 for real cache columns
    last: Tensor | None = None  # (B,) the token each row feeds next
    version: int = 0  # bumped whenever the rows change (the hooks re-plan)
    serial: int = field(default_factory=lambda: next(_BATCH_SERIALS))

    def select(self, keep: list[int]) -> None:
        """Keep rows `keep` (in order) and drop the cache columns no remaining row uses."""
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask[index]
        self.cache.batch_select_indices(index)
        used = self.mask.bool().any(dim=0)
        first = int(used.float().argmax()) if bool(used.any()) else 0
        if first > 0:
            self.mask = self.mask[:, first:]
            _map_cache(self.cache, lambda t: t[..., first:, :])
        self.version += 1

    def board(self, riders: list[_Rider], device: torch.device) -> None:
        """Append `riders` with empty caches (all-padding columns); each feeds its first prompt token next."""
        n = len(riders)
        for layer in _cache_layers(self.cache):
            layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((n, *layer.keys.shape[1:]))])
            layer.values = torch.cat([layer.values, layer.values.new_zeros((n, *layer.values.shape[1:]))])
        self.mask = torch.cat([self.mask, self.mask.new_zeros((n, self.mask.shape[1]))])
        self.rows += riders
        assert self.last is not None
        first = torch.tensor([r.prompt_ids[0] for r in riders], dtype=torch.long, device=device)
        self.last = torch.cat([self.last, first])
        self.version += 1

    def extend(self, other: _Batch) -> None:
        """Append `other`'s rows, left-padding whichever cache is shorter."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        pad_self, pad_other = width - self.mask.shape[1], width - other.mask.shape[1]
        for mine, theirs in zip(_cache_layers(self.cache), _cache_layers(other.cache), strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, pad_self), _left_pad(theirs.keys, pad_other)])
            mine.values = torch.cat([_left_pad(mine.values, pad_self), _left_pad(theirs.values, pad_other)])
            if hasattr(mine, "cumulative_length"):
                mine.cumulative_length = width
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (pad_self, 0)),
                               torch.nn.functional.pad(other.mask, (pad_other, 0))])
        self.rows += other.rows
        assert self.last is not None and other.last is not None
        self.last = torch.cat([self.last, other.last])
        self.version += 1


def _cache_layers(cache: Any) -> list[Any]:
    layers = [layer for layer in getattr(cache, "layers", ()) if getattr(layer, "keys", None) is not None]
    if not layers:
        raise RuntimeError(f"unsupported KV cache {type(cache).__name__}: "
                           "the engine needs per-layer keys and values")
    return layers


def _map_cache(cache: Any, fn: Any) -> None:
    for layer in _cache_layers(cache):
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = layer.keys.shape[-2]


def _left_pad(t: Tensor, n: int) -> Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[-2] = n
    return torch.cat([t.new_zeros(shape), t], dim=-2)


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


def _byte_alphabet(tokenizer: Any) -> dict[str, int] | None:
    """Byte-level BPE's vocabulary alphabet (GPT-2, Llama 3, Qwen, SmolLM): the character each byte is
    written as -> the byte; None for other tokenizers."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ != "ByteLevel" and not hasattr(tokenizer, "byte_decoder"):
        return None
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)}
    shifted = [b for b in range(256) if b not in printable]  # written as chr(256), chr(257), ... in order
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(shifted)}


def _piece_bytes(piece: str, alphabet: dict[str, int] | None) -> bytes:
    """A vocabulary entry's bytes: byte-level BPE through its alphabet; SentencePiece's `<0xNN>` byte
    tokens and `▁` spaces; anything else (added tokens) as its text."""
    if alphabet is not None and all(c in alphabet for c in piece):
        return bytes(alphabet[c] for c in piece)
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if byte is not None:
        return bytes([int(byte.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def _stop_token_ids(lm: LanguageModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (lm.tokenizer.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return frozenset(ids)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may still turn into a stop string or a multi-byte character."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return max(hold, _incomplete(text))


def _incomplete(text: str) -> int:
    """Characters at the end of `text` that a token ending mid-character left (it decodes to U+FFFD)."""
    return len(text) - len(text.rstrip("\ufffd"))


@dataclass(eq=False)
class _ScoreJob:
    items: list[OpinionItem]
    plans: list[SteeringPlan | None]
    deadline: float
    steering: list[RowSteering | None] = field(default_factory=list)
    applied: list[tuple[AppliedProfile, ...]] = field(default_factory=list)
    results: dict[int, np.ndarray] = field(default_factory=dict)  # item index -> its distribution
    unread: deque[int] = field(default_factory=deque)  # item indexes no read or rider has taken
    rideable: list[bool] = field(default_factory=list)  # per item: its steering may feed the prompt a token a step
    question_leans: list[tuple[QuestionLean | None, ...]] = field(default_factory=list)  # per item, per plan entry
    leans: dict[int, tuple[float | None, ...]] = field(default_factory=dict)  # item index -> what they read
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    queued: bool = True


_STOP = object()


class GenerationEngine:
    """Owns `lm` on one thread and serves generation and scoring requests from any thread.

    `profiles` loads a profile by its artifact digest (plans name profiles that way); without it only
    unsteered requests are served.
    """

    def __init__(self, lm: LanguageModel, *, profiles: ProfileSource | None = None, max_batch_size: int = 16,
                 batch_wait_ms: float = 10.0, max_new_tokens: int = 512, max_queue: int = 256,
                 request_timeout_s: float = 300.0, score_batch_size: int = 16, score_share: float = 0.25,
                 cache_size: int = 128) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if not 0.0 < score_share <= 1.0:
            raise ValueError("score_share must be in (0, 1]")
        self.lm = lm
        self.max_batch_size = max_batch_size
        self.batch_wait = max(0.0, batch_wait_ms) / 1000.0
        self.max_new_tokens = max_new_tokens
        self.max_queue = max(1, max_queue)
        self.request_timeout_s = request_timeout_s
        self.score_batch_size = max(1, score_batch_size)
        self.score_share = score_share
        self.context_length = context_length(lm)
        self.stats = EngineStats()
        self.interventions = InterventionCache(lm, profiles, cache_size)
        self._stop_ids = _stop_token_ids(lm)
        # Request threads tokenize on their own copy: a fast tokenizer must not be used by two threads
        # while one changes its padding settings (the engine's scoring does).
        self._request_tokenizer = copy.deepcopy(lm.tokenizer)
        self._tokenizer_lock = threading.Lock()
        self._byte_alphabet = _byte_alphabet(lm.tokenizer)
        self._token_bytes: dict[int, bytes] = {}
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._backlog: deque[_Row] = deque()
        self._scores: deque[_ScoreJob] = deque()
        self._score_debt = 0.0  # seconds of decoding owed before the next scoring batch
        # Moving averages that size scoring: seconds of one decode step and of reading one question whole;
        # seconds of a decode step without riders, by the number of rows decoding; a rider's extra seconds.
        self._decode_seconds: float | None = None
        self._score_row_seconds: float | None = None
        self._plain_step_seconds: dict[int, float] = {}
        self._rider_seconds: float | None = None
        self._batch: _Batch | None = None
        self._hooks: SteeringHooks | None = None
        self._planned: tuple[int, int] | None = None
        self._hook_failures: dict[int, Exception] = {}
        self._next_id = 0
        self._thread: threading.Thread | None = None
        # Guards starting, stopping, ids and the queue count: nothing enters the inbox after a stop.
        self._lock = threading.Lock()
        self._stopped = False
        params = inspect.signature(lm.model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._position_ids = "position_ids" in params
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.24
        pad = lm.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else next(iter(self._stop_ids), 0))

    # ---- request-thread API -------------------------------------------------------------------------

    def start(self) -> GenerationEngine:
        """Start the engine thread (once; later calls do nothing)."""
        with self._lock:
            self._start_locked()
        return self

    def _start_locked(self) -> None:
        if self._stopped:
            raise EngineStopped("the generation engine was stopped")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the engine thread. Every request it admitted ends: unfinished ones fail with
        `EngineStopped`. False when the thread did not end within `timeout` (it is stuck in a model call;
        it still fails what it holds when that call returns)."""
        with self._lock:
            self._stopped = True
            thread = self._thread
            if thread is not None:
                self._inbox.put(_STOP)  # the last item: nothing is queued after a stop
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
        self._fail_everything(EngineStopped("the generation engine was stopped"))
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_depth(self) -> int:
        """Requests submitted and not yet running or finished."""
        return self.stats.queued

    def tokenize_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Prompt token ids for chat `messages` (`role`, `content`), ending where the assistant speaks."""
        with self._tokenizer_lock:
            tok = self._request_tokenizer
            if tok.chat_template:
                text = tok.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                               add_generation_prompt=True)
                return list(tok.encode(text, add_special_tokens=False))
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return list(tok.encode(text))

    def score_prompt_tokens(self, item: OpinionItem) -> int:
        """Length in tokens of the prompt the answer reader builds for `item`."""
        with self._tokenizer_lock:
            return len(prompt_token_ids(self._request_tokenizer, item))

    def token_bytes(self, tokens: Sequence[int]) -> list[bytes]:
        """The raw UTF-8 bytes each token stands for (a token may hold part of a character)."""
        with self._tokenizer_lock:
            missing = [t for t in set(tokens) if t not in self._token_bytes]
            for t, piece in zip(missing, self._request_tokenizer.convert_ids_to_tokens(missing), strict=True):
                self._token_bytes[t] = _piece_bytes(piece, self._byte_alphabet)
            return [self._token_bytes[t] for t in tokens]

    def _enqueue(self, item: _Row | _ScoreJob) -> None:
        with self._lock:
            self._start_locked()
            if self.stats.queued >= self.max_queue:
                retry = 1 + self.stats.queued // self.max_batch_size
                raise EngineBusy(f"the generation engine has {self.stats.queued} requests waiting; retry later",
                                 retry_after=retry)
            self.stats.queued += 1
            self._inbox.put(item)

    def _leave_queue(self, item: _Row | _ScoreJob) -> None:
        if item.queued:
            item.queued = False
            with self._lock:
                self.stats.queued -= 1

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.request_timeout_s if timeout is None else timeout)

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams, plan: SteeringPlan | None = None,
               timeout: float | None = None) -> GenerationHandle:
        """Queue one generation; returns at once. `plan` is this row's steering (None: none); the request
        is dropped `timeout` seconds from now (default `request_timeout_s`) if it has not finished."""
        sampling.check(self.max_new_tokens)
        if not prompt_ids:
            raise SteerError("the prompt is empty", "prompt")
        if len(prompt_ids) >= self.context_length:
            raise SteerError(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                             f"{self.context_length} tokens", "prompt")
        with self._lock:
            self._next_id += 1
            handle = GenerationHandle(self._next_id, len(prompt_ids), self._deadline(timeout))
        generator = None
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(7), "little")
            generator = torch.Generator().manual_seed(seed)
        row = _Row(handle=handle, prompt_ids=[int(t) for t in prompt_ids], sampling=sampling,
                   plan=plan if plan else None,
                   max_tokens=min(sampling.max_tokens, self.context_length - len(prompt_ids)),
                   generator=generator)
        self._enqueue(row)
        return handle

    def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams, plan: SteeringPlan | None = None,
                 timeout: float | None = None) -> GenerationResult:
        """`submit` and wait for the result (`timeout` per chunk)."""
        handle = self.submit(prompt_ids, sampling, plan)
        try:
            return handle.result(timeout)
        except TimeoutError:
            handle.cancel()
            raise

    def score(self, items: Sequence[OpinionItem], plan: SteeringPlan | Sequence[SteeringPlan | None] | None = None,
              timeout: float | None = None) -> Scored:
        """Answer distributions of `items` under `plan` (one for every item, or one per item), read on the
        engine thread between decode steps."""
        if plan is None or isinstance(plan, SteeringPlan):
            plans: list[SteeringPlan | None] = [plan if plan else None] * len(items)
        else:
            plans = [p if p else None for p in plan]
            if len(plans) != len(items):
                raise ValueError(f"{len(plans)} plans for {len(items)} items")
        job = _ScoreJob(items=list(items), plans=plans, deadline=self._deadline(timeout),
                        unread=deque(range(len(items))))
        self._enqueue(job)
        # The engine drops the job at its deadline; the margin covers one scoring batch in flight.
        if not job.done.wait(max(0.0, job.deadline - time.monotonic()) + 60.0):
            raise DeadlineExceeded("scoring did not finish in time")
        if job.error is not None:
            raise job.error
        return Scored(distributions=[job.results[i] for i in range(len(job.items))], applied=job.applied,
                      leans=[job.leans.get(i, (None,) * len(job.question_leans[i])) for i in range(len(job.items))])

    # ---- the engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                try:
                    if not self._step():
                        break
                except Exception as exc:  # never let the thread die: fail what was running, go on
                    self._fail_batch(exc)
        self._remove_hooks()

    def _step(self) -> bool:
        """One round: admit new work, prefill it, one decode step, at most one scoring batch. False once
        stopped."""
        rows, stop = self._admit()
        if stop:
            self._shutdown(rows)
            return False
        if rows:
            self._prefill(rows)
        self._expire_jobs()
        if self._batch is not None:
            self._board()
            generating = self._generating()
            riding = len(self._batch.rows) - generating
            started = time.perf_counter()
            self._decode()
            spent = time.perf_counter() - started
            self._score_debt -= spent
            self._decode_seconds = _moving_average(self._decode_seconds, spent)
            self._measure_step(generating, riding, spent)
            if self._batch is not None and self._generating() == 0:
                self._land_riders()
        if self._batch is None:
            self._score_debt = 0.0  # nobody is waiting for tokens: score flat out
        read = self._next_read() if self._score_debt <= 0 else None
        if read is not None:
            spent = self._score_batch(*read)
            if self._batch is not None:
                self._score_debt += spent * (1.0 - self.score_share) / self.score_share
        if self._batch is None and not self._scores:
            self._remove_hooks()  # idle: the model is left unsteered
        self.stats.active_rows = self._generating()
        return True

    def _generating(self) -> int:
        """Generation rows in the running batch (riders not counted)."""
        return sum(isinstance(r, _Row) for r in self._batch.rows) if self._batch is not None else 0

    def _admit(self) -> tuple[list[_Row], bool]:
        """Take what arrived (resolving its steering), and the rows that fit into the batch."""
        running = self._generating()
        room = self.max_batch_size - running
        stop = False

        def take(item: Any) -> None:
            nonlocal stop
            if item is _STOP:
                stop = True
            elif isinstance(item, _ScoreJob):
                if self._resolve_job(item):
                    self._scores.append(item)
            elif self._resolve_row(item):
                self._backlog.append(item)

        if running == 0 and not self._backlog and not self._scores:
            take(self._inbox.get())  # idle: sleep until something arrives
            deadline = time.monotonic() + self.batch_wait
            # Bounded wait: give concurrent requests a moment to join the first batch.
            while not stop and not self._scores and len(self._backlog) < room:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    take(self._inbox.get(timeout=left))
                except queue.Empty:
                    break
        while not stop:
            try:
                take(self._inbox.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        rows: list[_Row] = []
        kept: deque[_Row] = deque()
        while self._backlog:
            row = self._backlog.popleft()
            if row.handle.cancelled:
                self._finish(row, "cancelled")
            elif now > row.handle.deadline:
                self._expire(row)
            elif len(rows) < room:
                rows.append(row)
            else:
                kept.append(row)
        self._backlog = kept
        return rows, stop

    def _resolve_row(self, row: _Row) -> bool:
        try:
            row.steering, applied = self.interventions.resolve(row.plan)
        except Exception as exc:
            self._reject(row, exc)
            return False
        row.handle._put(_STARTED, applied)
        return True

    def _resolve_job(self, job: _ScoreJob) -> bool:
        try:
            for plan in job.plans:
                steering, applied = self.interventions.resolve(plan)
                leans = self.interventions.question_leans(plan)
                job.steering.append(steering)
                job.applied.append(applied)
                job.question_leans.append(leans)
                # A question lean reads the whole prompt's states: such an item is read whole, not ridden.
                job.rideable.append((not steering or steers_in_chunks(steering)) and not any(leans))
        except Exception as exc:
            self._end_job(job, exc)
            return False
        return True

    def _reject(self, row: _Row, exc: BaseException) -> None:
        self._leave_queue(row)
        self.stats.rejected += 1
        row.handle._put(_ERROR, exc if isinstance(exc, SteeringRejected | SteerError)
                        else _wrapped(exc))

    def _forward(self, input_ids: Tensor, mask: Tensor, steering: list[RowSteering | None] | None,
                 prompt_length: int | list[int], cache: Any = None, plan_key: tuple[int, int] | None = None) -> Any:
        """One model call. `plan_key` names a batch composition: the hooks are re-planned only when it
        changes (a prefill always re-plans)."""
        self._hook_failures = {}
        if steering is not None:
            if self._hooks is None:
                self._hooks = SteeringHooks(self.lm, on_error=self._on_hook_error)
                self._planned = None
            if plan_key is None or plan_key != self._planned:
                self._hooks.plan(steering, prompt_length)
                self._planned = plan_key
            self.stats.steered_steps += 1
        else:
            self._remove_hooks()
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": True}
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        if self._position_ids:
            # Left padding: a row's positions count its real tokens only.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            kwargs["position_ids"] = positions[:, -input_ids.shape[1]:]
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.lm.model(**kwargs)

    def _on_hook_error(self, rows: Tensor, exc: Exception) -> None:
        for i in rows.tolist():
            self._hook_failures.setdefault(int(i), exc)

    def _remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        self._planned = None

    def _steering_of(self, rows: Sequence[_Row | _Rider]) -> list[RowSteering | None] | None:
        plans = [row.steering for row in rows]
        return plans if any(plans) else None

    def _prefill(self, rows: list[_Row]) -> None:
        for row in rows:
            self._leave_queue(row)
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            mask[i, width - len(row.prompt_ids):] = 1
        ids, mask = ids.to(self.lm.device), mask.to(self.lm.device)
        self._planned = None
        try:
            out = self._forward(ids, mask, self._steering_of(rows), prompt_length=width)
        except Exception as exc:
            if len(rows) > 1:  # find the row at fault: each alone
                for row in rows:
                    self._prefill([row])
                return
            self._fail(rows[0], exc)
            return
        self.stats.prefills += 1
        batch = _Batch(rows=[*rows], cache=getattr(out, self._cache_kwarg), mask=mask)
        if self._advance(batch, out.logits[:, -1, :]):
            if self._batch is None:
                self._batch = batch
            else:
                self._batch.extend(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, self._generating())

    def _decode(self) -> None:
        batch = self._batch
        assert batch is not None and batch.last is not None
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        steering = self._steering_of(batch.rows)
        # Each row's prompt ends where its generation began, or (a rider) where its prompt will end; both stay
        # put as the batch grows a column a step, so the hooks re-plan only when the rows change.
        width = mask.shape[1]
        prompt_ends = [r.prompt_end(width) if isinstance(r, _Rider) else width - len(r.generated)
                       for r in batch.rows]
        try:
            out = self._forward(batch.last.view(-1, 1), mask, steering, prompt_length=prompt_ends,
                                cache=batch.cache, plan_key=(batch.serial, batch.version))
        except Exception as exc:
            self._fail_batch(exc)
            return
        self.stats.steps += 1
        batch.mask = mask
        if not self._advance(batch, out.logits[:, -1, :]):
            self._batch = None

    def _advance(self, batch: _Batch, logits: Tensor) -> bool:
        """Sample each row's next token, send its text, drop finished rows. False when none is left."""
        failures = self._hook_failures
        self._hook_failures = {}
        logits = logits.float()
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        greedy = logits.argmax(dim=-1).tolist()
        # Log-probabilities for the rows that asked for them only.
        asking = [i for i, row in enumerate(batch.rows)
                  if isinstance(row, _Row) and row.sampling.top_logprobs is not None]
        log_probs = dict(zip(asking, torch.log_softmax(logits[asking], dim=-1).cpu(), strict=True)) if asking \
            else {}
        now = time.monotonic()
        on_cpu = None
        keep: list[int] = []
        nxt: list[int] = []
        for i, row in enumerate(batch.rows):
            if isinstance(row, _Rider):
                if self._ride(row, logits[i], failures.get(i)):
                    keep.append(i)
                    nxt.append(row.prompt_ids[row.fed])
                continue
            if row.handle.cancelled:
                self._finish(row, "cancelled")
                continue
            if now > row.handle.deadline:
                self._expire(row)
                continue
            if i in failures:
                self._fail(row, failures[i])
                continue
            if not finite[i]:
                self._fail(row, GenerationFailed("the model produced non-finite logits for this request "
                                                 "(steering too strong?)"))
                continue
            try:
                if row.sampling.temperature == 0:
                    token = int(greedy[i])
                else:
                    if on_cpu is None:
                        on_cpu = logits.cpu()
                    token = self._sample(on_cpu[i], row)
                entry = _token_logprob(log_probs[i], token, row.sampling.top_logprobs or 0) \
                    if i in log_probs else None
                if self._emit(row, token, entry):
                    continue
            except Exception as exc:
                self._fail(row, exc)
                continue
            keep.append(i)
            nxt.append(token)
        if not keep:
            return False
        if len(keep) < len(batch.rows):
            batch.select(keep)
        batch.last = torch.tensor(nxt, dtype=torch.long, device=self.lm.device)
        return True

    def _ride(self, rider: _Rider, logits: Tensor, failure: Exception | None) -> bool:
        """Advance `rider` past the token it fed; True while it has prompt tokens left to feed. After its last
        one, the logits are its answer's: record its distribution."""
        job = rider.job
        if job.done.is_set():  # its request ended (deadline, error)
            return False
        if failure is not None:
            self._end_scoring(job, failure)
            return False
        rider.fed += 1
        if rider.fed < len(rider.prompt_ids):
            return True
        self._answer(rider, logits)
        return False

    def _answer(self, rider: _Rider, logits: Tensor) -> None:
        """Record a rider's distribution from the logits after its last prompt token."""
        item = rider.job.items[rider.index]
        probs = option_log_probs(self.lm, logits.unsqueeze(0).float(), [item]).exp().cpu().numpy()[0]
        self.stats.score_riders += 1
        self._record(rider.job, {rider.index: probs[:len(item.options)].astype(np.float64)})

    def _land_riders(self) -> None:
        """The streams have ended and only riders are left: run the rest of their prompts in one call on their
        caches (each row's rest right-aligned, padding between its cache and its rest masked out), so the
        positions they fed are not run again."""
        batch, self._batch = self._batch, None
        assert batch is not None
        riders = [r for r in batch.rows if isinstance(r, _Rider)]
        rests = [r.prompt_ids[r.fed:] for r in riders]
        longest = max(len(rest) for rest in rests)
        ids = torch.full((len(riders), longest), self._pad_id, dtype=torch.long)
        tail = torch.zeros((len(riders), longest), dtype=torch.long)
        for i, rest in enumerate(rests):
            ids[i, longest - len(rest):] = torch.tensor(rest)
            tail[i, longest - len(rest):] = 1
        mask = torch.cat([batch.mask, tail.to(batch.mask.device)], dim=1)
        try:
            out = self._forward(ids.to(self.lm.device), mask, self._steering_of(riders),
                                prompt_length=[mask.shape[1]] * len(riders), cache=batch.cache)
        except Exception:
            for rider in riders:  # read again whole, where an error of their own surfaces
                self._unboard(rider)
            return
        failures, self._hook_failures = self._hook_failures, {}
        for i, rider in enumerate(riders):
            if rider.job.done.is_set():
                continue
            if i in failures:
                self._end_scoring(rider.job, failures[i])
            else:
                self._answer(rider, out.logits[i, -1, :])

    def _unboard(self, rider: _Rider) -> None:
        """Give a rider's question back to its request, to be read again."""
        if not rider.job.done.is_set():
            rider.job.unread.appendleft(rider.index)

    @staticmethod
    def _sample(logits: Tensor, row: _Row) -> int:
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

    def _emit(self, row: _Row, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record `token` (and its `logprob` entry) for `row`, send what text is safe to send; True when the
        row is finished. A stop token is no part of the text, nor of the log-probabilities."""
        self.stats.tokens += 1
        if token in self._stop_ids and not row.sampling.ignore_eos:
            self._finish(row, "stop")
            return True
        row.generated.append(token)
        text = self._decode_text(row)
        if logprob is not None:
            row.logprobs.append(logprob)
            row.ends.append(len(text) - _incomplete(text))
        stops = row.sampling.stop
        if stops:
            hits = [i for i in (text.find(s, max(0, row.sent - len(s))) for s in stops) if i >= 0]
            if hits:
                self._finish(row, "stop", text[:min(hits)])
                return True
        if len(row.generated) >= row.max_tokens:
            self._finish(row, "length", text)
            return True
        self._send(row, text, len(text) - _held_back(text, stops))
        return False

    def _send(self, row: _Row, text: str, upto: int, final: bool = False) -> None:
        """Send `text[row.sent:upto]` with the log-probabilities of the tokens whose text it completes; the
        `final` chunk also takes a token that a stop string cut (its text begins before `upto`)."""
        n = row.logprobs_sent
        while n < len(row.ends) and (row.ends[n] <= upto or final and (row.ends[n - 1] if n else 0) < upto):
            n += 1
        if upto > row.sent or n > row.logprobs_sent:
            row.handle._put(_CHUNK, TextChunk(text[row.sent:upto], tuple(row.logprobs[row.logprobs_sent:n])))
            row.sent, row.logprobs_sent = max(row.sent, upto), n

    def _decode_text(self, row: _Row) -> str:
        # transformers types `decode` for a batch too (list[str]); one sequence of ids decodes to a str.
        return self.lm.tokenizer.decode(row.generated, skip_special_tokens=True,  # type: ignore[return-value]
                                        clean_up_tokenization_spaces=False)

    def _finish(self, row: _Row, reason: str, text: str | None = None) -> None:
        self._leave_queue(row)
        if text is None:
            text = self._decode_text(row)
        if reason != "cancelled":
            self._send(row, text, len(text), final=True)
        result = GenerationResult(text=text, token_ids=list(row.generated), finish_reason=reason,
                                  prompt_tokens=len(row.prompt_ids), completion_tokens=len(row.generated),
                                  logprobs=row.logprobs[:row.logprobs_sent]
                                  if row.sampling.top_logprobs is not None else None)
        row.handle._put(_DONE, result)
        self.stats.finished += 1
        if reason == "cancelled":
            self.stats.cancelled += 1

    def _fail(self, row: _Row, exc: BaseException) -> None:
        self._leave_queue(row)
        if not isinstance(exc, GenerationFailed | SteerError | EngineStopped | DeadlineExceeded):
            exc = _wrapped(exc)
        row.handle._put(_ERROR, exc)
        self.stats.finished += 1
        self.stats.failed += 1

    def _expire(self, row: _Row) -> None:
        self.stats.expired += 1
        self._fail(row, DeadlineExceeded("the request did not finish before its deadline"))

    def _fail_batch(self, exc: BaseException) -> None:
        batch, self._batch = self._batch, None
        self._remove_hooks()
        if batch is not None:
            for row in batch.rows:
                if isinstance(row, _Rider):
                    self._unboard(row)
                else:
                    self._fail(row, exc)
        self.stats.active_rows = 0

    def _shutdown(self, admitted: list[_Row]) -> None:
        """The stop arrived: end every request this thread holds, those admitted in this round included."""
        stopped = EngineStopped("the generation engine was stopped")
        for row in admitted:
            self._fail(row, stopped)
        self._fail_held(stopped)

    def _fail_held(self, exc: BaseException) -> None:
        self._fail_batch(exc)
        while self._backlog:
            self._fail(self._backlog.popleft(), exc)
        while self._scores:
            self._end_job(self._scores.popleft(), exc)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _ScoreJob):
                self._end_job(item, exc)
            elif isinstance(item, _Row):
                self._fail(item, exc)

    def _fail_everything(self, exc: BaseException) -> None:
        if self.running:
            return  # the thread still owns its state
        self._fail_held(exc)

    def _end_job(self, job: _ScoreJob, exc: BaseException | None = None) -> None:
        self._leave_queue(job)
        job.error = exc
        job.done.set()

    def _expire_jobs(self) -> None:
        now = time.monotonic()
        for job in [job for job in self._scores if now > job.deadline]:
            self._end_scoring(job, DeadlineExceeded("scoring did not finish before its deadline"))

    def _end_scoring(self, job: _ScoreJob, exc: BaseException | None = None) -> None:
        if job in self._scores:
            self._scores.remove(job)
        self._end_job(job, exc)

    def _record(self, job: _ScoreJob, distributions: Mapping[int, np.ndarray]) -> None:
        job.results.update(distributions)
        if len(job.results) == len(job.items):
            self._end_scoring(job)

    def _board(self) -> None:
        """Let unread questions ride the running batch, as many as keep their cost within `score_share`."""
        assert self._batch is not None
        generating = self._generating()
        riding = len(self._batch.rows) - generating
        plain = self._plain_step_seconds.get(generating)
        # Unmeasured for this many rows: add none, so that a step without riders measures it.
        room = (scoring_rows(plain, self._rider_seconds, self.score_share, self.score_batch_size)
                if plain is not None else riding) - riding
        if room <= 0:
            return
        riders: list[_Rider] = []
        for job in self._scores:
            for index in list(itertools.islice((i for i in job.unread if job.rideable[i]), room - len(riders))):
                job.unread.remove(index)
                riders.append(_Rider(job=job, index=index, steering=job.steering[index],
                                     prompt_ids=prompt_token_ids(self.lm.tokenizer, job.items[index])))
            if len(riders) >= room:
                break
        if riders:
            self._batch.board(riders, self.lm.device)

    def _measure_step(self, generating: int, riding: int, seconds: float) -> None:
        plain = self._plain_step_seconds.get(generating)
        if riding == 0:
            self._plain_step_seconds[generating] = _moving_average(plain, seconds)
        elif plain is not None:
            self._rider_seconds = _moving_average(self._rider_seconds, max(0.0, seconds - plain) / riding)

    def _score_rows(self) -> int:
        """Questions for the next whole read: `score_batch_size` while no row decodes; otherwise as many as
        take `score_share` of a decode step's time, at least one."""
        if self._batch is None:
            return self.score_batch_size
        return scoring_rows(self._decode_seconds, self._score_row_seconds, self.score_share, self.score_batch_size)

    def _next_read(self) -> tuple[_ScoreJob, list[int]] | None:
        """The next whole read: unread questions of the oldest request that has some (while rows decode, only
        those that cannot ride)."""
        decoding = self._batch is not None
        for job in self._scores:
            picked = list(itertools.islice((i for i in job.unread if not (decoding and job.rideable[i])),
                                           self._score_rows()))
            if picked:
                return job, picked
        return None

    def _score_batch(self, job: _ScoreJob, indexes: list[int]) -> float:
        """Read the questions `indexes` of `job` whole, in one call; the seconds it took."""
        for index in indexes:
            job.unread.remove(index)
        items = [job.items[i] for i in indexes]
        steering = [job.steering[i] for i in indexes]
        # read_answers attaches its own hooks; the engine's must be off meanwhile.
        self._remove_hooks()
        probes = [job.question_leans[i] for i in indexes]
        began = time.perf_counter()
        try:
            # One order as asked: a caller that wants both orders asks for both (as /v1/score does).
            read = read_answers(self.lm, items, steering if any(steering) else None,
                                sorted({p.layer for row in probes for p in row if p is not None}),
                                batch_size=len(items), orders=1)
        except Exception as exc:
            self._end_scoring(job, exc)
            return time.perf_counter() - began
        distributions = read.distributions
        for k, (index, row) in enumerate(zip(indexes, probes, strict=True)):
            if any(row):
                job.leans[index] = tuple(None if p is None else float(p.leans(read.states[p.layer][k:k + 1])[0])
                                         for p in row)
        spent = time.perf_counter() - began
        self._score_row_seconds = _moving_average(self._score_row_seconds, spent / len(items))
        self.stats.score_batches += 1
        self.stats.score_rows = len(items)
        self._record(job, dict(zip(indexes, distributions, strict=True)))
        return spent


def scoring_rows(step_seconds: float | None, row_seconds: float | None, share: float, most: int) -> int:
    """Questions that take `share` of the engine's time beside a step of `step_seconds` (`share / (1 - share)`
    of it), each costing `row_seconds`: read whole between decode steps (a step and a question's read), or
    riding a step (a step without riders and a rider's extra time). At least one, at most `most`; one until
    both times are measured."""
    if share >= 1.0:
        return most
    if step_seconds is None or row_seconds is None:
        return 1
    budget = step_seconds * share / (1.0 - share)
    return max(1, min(most, int(budget / max(row_seconds, 1e-9))))


def _moving_average(average: float | None, value: float, weight: float = 0.25) -> float:
    """An exponential moving average (the first value starts it)."""
    return value if average is None else (1.0 - weight) * average + weight * value


def _token_logprob(log_probs: Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s entry from its step's log-softmax over the vocabulary, with the `k` most likely tokens."""
    values, ids = log_probs.topk(k)
    return TokenLogprob(token=token, logprob=float(log_probs[token]),
                        top=tuple(zip(ids.tolist(), values.tolist(), strict=True)))


def _wrapped(exc: BaseException) -> GenerationFailed:
    wrapped = GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped
