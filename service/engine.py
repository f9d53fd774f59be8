"""The generation engine: one thread owns the model and runs every request of the process.

Request threads never touch the model. They tokenize (on their own copy of the tokenizer), then hand the
engine a prompt, sampling parameters and a steering plan (`steer_core.RowSteering`, already composed from
weighted profiles) with `submit`, and read text chunks from the `GenerationHandle` they get back.

The engine thread batches concurrent requests dynamically: when it is idle it waits at most
`batch_wait_ms` after the first arrival to fill a batch; while a batch runs, new requests are prefilled
between decode steps and concatenated into it (their KV caches left-padded to a common length), up to
`max_batch_size` rows. Every row keeps its own steering through `SteeringHooks.plan` (one row per
request); a batch with no steered row runs with no hooks at all. A row that finishes (stop token, stop
string, `max_tokens`), is cancelled (client gone) or fails leaves the batch at the next step; an
intervention that raises fails only the rows it steers.

Scoring (`score`) runs on the same thread, between decode steps, through the one answer reader
`steer_core.prompts.answer_distributions`.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from steer_core.data import OpinionItem
from steer_core.errors import SteerError
from steer_core.models import LanguageModel
from steer_core.prompts import answer_distributions, format_prompt
from steer_core.steering import RowSteering, SteeringHooks

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: `temperature == 0` is greedy; `stop` strings end the text (excluded)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_tokens whatever the model says (benchmarks)

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


@dataclass(frozen=True)
class TextChunk:
    """New text of one request (a stop string's prefix is held back until it is known not to be one)."""

    text: str


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # one of FINISH_REASONS
    prompt_tokens: int
    completion_tokens: int


class GenerationFailed(RuntimeError):
    """This request's row failed; the other rows of its batch went on."""


class EngineStopped(RuntimeError):
    """The engine was stopped before the request finished."""


_DONE, _CHUNK, _ERROR = "done", "chunk", "error"
_BATCH_SERIALS = itertools.count()


class GenerationHandle:
    """What a request thread holds: an iterator of text chunks, the final result, and `cancel`."""

    def __init__(self, request_id: int, prompt_tokens: int) -> None:
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._chunks: list[str] = []

    def cancel(self) -> None:
        """Ask the engine to drop this request; its batch slot is freed at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def chunks(self, timeout: float | None = None) -> Iterator[TextChunk]:
        """Text chunks as they are generated; ends when the request finishes, raises if it failed.

        `timeout` bounds the wait for each chunk (TimeoutError past it).
        """
        while self._result is None:
            if self._error is not None:
                raise self._error
            try:
                kind, value = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError("no output from the generation engine in time") from None
            if kind == _CHUNK:
                self._chunks.append(value.text)
                yield value
            elif kind == _DONE:
                self._result = value
            else:
                self._error = value
                raise value

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
    steps: int = 0  # decode steps run
    prefills: int = 0  # prefill calls run
    tokens: int = 0  # tokens generated
    finished: int = 0  # requests finished (any reason, failures included)
    failed: int = 0
    cancelled: int = 0
    largest_batch: int = 0
    steered_steps: int = 0  # forward calls that ran with steering hooks attached


@dataclass(eq=False)
class _Row:
    handle: GenerationHandle
    prompt_ids: list[int]
    sampling: SamplingParams
    steering: RowSteering | None
    max_tokens: int
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already sent


@dataclass(eq=False)
class _Batch:
    """The running batch: rows, their shared KV cache (left-padded), attention mask and next inputs."""

    rows: list[_Row]
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
    incomplete = len(text) - len(text.rstrip("\ufffd"))  # a token that ends mid-character decodes to U+FFFD
    return max(hold, incomplete)


@dataclass(eq=False)
class _ScoreJob:
    items: list[OpinionItem]
    steering: list[RowSteering | None] | None
    done: threading.Event = field(default_factory=threading.Event)
    result: list[np.ndarray] | None = None
    error: BaseException | None = None


_STOP = object()


class GenerationEngine:
    """Owns `lm` on one thread and serves generation and scoring requests from any thread."""

    def __init__(self, lm: LanguageModel, *, max_batch_size: int = 16, batch_wait_ms: float = 10.0,
                 max_new_tokens: int = 512) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.lm = lm
        self.max_batch_size = max_batch_size
        self.batch_wait = max(0.0, batch_wait_ms) / 1000.0
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length(lm)
        self.stats = EngineStats()
        self._stop_ids = _stop_token_ids(lm)
        # Request threads tokenize on their own copy: a fast tokenizer must not be used by two threads
        # while one changes its padding settings (the engine's scoring does).
        self._request_tokenizer = copy.deepcopy(lm.tokenizer)
        self._tokenizer_lock = threading.Lock()
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._backlog: deque[_Row] = deque()
        self._batch: _Batch | None = None
        self._hooks: SteeringHooks | None = None
        self._planned: tuple[int, int] | None = None
        self._hook_failures: dict[int, Exception] = {}
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
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
        with self._start_lock:
            if self._stopped:
                raise EngineStopped("the generation engine was stopped")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine thread; unfinished requests fail with `EngineStopped`."""
        with self._start_lock:
            self._stopped = True
            thread = self._thread
        if thread is not None:
            self._inbox.put(_STOP)
            thread.join(timeout)
        self._fail_everything(EngineStopped("the generation engine was stopped"))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_depth(self) -> int:
        """Requests submitted and not yet running (approximate: read from another thread)."""
        return self._inbox.qsize() + len(self._backlog)

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
            tok = self._request_tokenizer
            return len(tok.encode(format_prompt(tok, item), add_special_tokens=not tok.chat_template))

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams,
               steering: RowSteering | None = None) -> GenerationHandle:
        """Queue one generation; returns at once. `steering` is this row's composed steering (None: none)."""
        sampling.check(self.max_new_tokens)
        if not prompt_ids:
            raise SteerError("the prompt is empty", "prompt")
        if len(prompt_ids) >= self.context_length:
            raise SteerError(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                             f"{self.context_length} tokens", "prompt")
        if steering:
            for iv in steering:
                self.lm.check_layer(iv.layer)
        self.start()
        with self._id_lock:
            self._next_id += 1
            handle = GenerationHandle(self._next_id, len(prompt_ids))
        generator = None
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(7), "little")
            generator = torch.Generator().manual_seed(seed)
        row = _Row(handle=handle, prompt_ids=[int(t) for t in prompt_ids], sampling=sampling,
                   steering=list(steering) if steering else None,
                   max_tokens=min(sampling.max_tokens, self.context_length - len(prompt_ids)),
                   generator=generator)
        self._inbox.put(row)
        return handle

    def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams,
                 steering: RowSteering | None = None, timeout: float | None = None) -> GenerationResult:
        """`submit` and wait for the result."""
        handle = self.submit(prompt_ids, sampling, steering)
        try:
            return handle.result(timeout)
        except TimeoutError:
            handle.cancel()
            raise

    def score(self, items: Sequence[OpinionItem], steering: Sequence[RowSteering | None] | None = None,
              timeout: float | None = None) -> list[np.ndarray]:
        """Answer distributions of `items` (one steering per item, or None), read on the engine thread."""
        if steering is not None and len(steering) != len(items):
            raise ValueError(f"steering has {len(steering)} rows for {len(items)} items")
        job = _ScoreJob(items=list(items), steering=list(steering) if steering is not None else None)
        self.start()
        self._inbox.put(job)
        if not job.done.wait(timeout):
            raise TimeoutError("scoring did not finish in time")
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

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
        """One round: admit new work, prefill it, one decode step. False once stopped."""
        new_rows, jobs, stop = self._admit()
        for job in jobs:
            self._run_score(job)
        if stop:
            return False
        if new_rows:
            self._prefill(new_rows)
        if self._batch is not None:
            self._decode()
        if self._batch is None:
            self._remove_hooks()  # idle: the model is left unsteered
        self.stats.active_rows = len(self._batch.rows) if self._batch is not None else 0
        return True

    def _admit(self) -> tuple[list[_Row], list[_ScoreJob], bool]:
        running = len(self._batch.rows) if self._batch is not None else 0
        room = self.max_batch_size - running
        rows: list[_Row] = []
        jobs: list[_ScoreJob] = []
        stop = False

        def take(item: Any) -> None:
            nonlocal stop
            if item is _STOP:
                stop = True
            elif isinstance(item, _ScoreJob):
                jobs.append(item)
            else:
                self._backlog.append(item)

        if running == 0 and not self._backlog:
            take(self._inbox.get())  # idle: sleep until something arrives
            deadline = time.monotonic() + self.batch_wait
            # Bounded wait: give concurrent requests a moment to join the first batch.
            while not stop and not jobs and len(self._backlog) < room:
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
        while self._backlog and len(rows) < room:
            row = self._backlog.popleft()
            if row.handle.cancelled:
                self._finish(row, "cancelled")
            else:
                rows.append(row)
        return rows, jobs, stop

    def _forward(self, input_ids: Tensor, mask: Tensor, steering: list[RowSteering | None] | None,
                 prompt_length: int, cache: Any = None, plan_key: tuple[int, int] | None = None) -> Any:
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

    def _steering_of(self, rows: Sequence[_Row]) -> list[RowSteering | None] | None:
        plans = [row.steering for row in rows]
        return plans if any(plans) else None

    def _prefill(self, rows: list[_Row]) -> None:
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
        batch = _Batch(rows=rows, cache=getattr(out, self._cache_kwarg), mask=mask)
        if self._advance(batch, out.logits[:, -1, :]):
            if self._batch is None:
                self._batch = batch
            else:
                self._batch.extend(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(self._batch.rows))

    def _decode(self) -> None:
        batch = self._batch
        assert batch is not None and batch.last is not None
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        steering = self._steering_of(batch.rows)
        # Decode calls hold no prompt position; the prompt ends where the shortest generation began.
        prompt_end = mask.shape[1] - min(len(r.generated) for r in batch.rows)
        try:
            out = self._forward(batch.last.view(-1, 1), mask, steering, prompt_length=prompt_end,
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
        on_cpu = None
        keep: list[int] = []
        nxt: list[int] = []
        for i, row in enumerate(batch.rows):
            if row.handle.cancelled:
                self._finish(row, "cancelled")
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
                if self._emit(row, token):
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

    @staticmethod
    def _sample(logits: Tensor, row: _Row) -> int:
        probs = torch.softmax(logits / row.sampling.temperature, dim=-1)
        if row.sampling.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            before = ordered.cumsum(-1) - ordered  # mass of the more likely tokens
            ordered = ordered.masked_fill(before >= row.sampling.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, ordered)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _emit(self, row: _Row, token: int) -> bool:
        """Record `token` for `row`, send what text is safe to send; True when the row is finished."""
        self.stats.tokens += 1
        if token in self._stop_ids and not row.sampling.ignore_eos:
            self._finish(row, "stop")
            return True
        row.generated.append(token)
        text = self._decode_text(row)
        stops = row.sampling.stop
        if stops:
            hits = [i for i in (text.find(s, max(0, row.sent - len(s))) for s in stops) if i >= 0]
            if hits:
                self._finish(row, "stop", text[:min(hits)])
                return True
        if len(row.generated) >= row.max_tokens:
            self._finish(row, "length", text)
            return True
        safe = len(text) - _held_back(text, stops)
        if safe > row.sent:
            row.handle._put(_CHUNK, TextChunk(text[row.sent:safe]))
            row.sent = safe
        return False

    def _decode_text(self, row: _Row) -> str:
        return self.lm.tokenizer.decode(row.generated, skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False)

    def _finish(self, row: _Row, reason: str, text: str | None = None) -> None:
        if text is None:
            text = self._decode_text(row)
        if len(text) > row.sent and reason != "cancelled":
            row.handle._put(_CHUNK, TextChunk(text[row.sent:]))
            row.sent = len(text)
        result = GenerationResult(text=text, token_ids=list(row.generated), finish_reason=reason,
                                  prompt_tokens=len(row.prompt_ids), completion_tokens=len(row.generated))
        row.handle._put(_DONE, result)
        self.stats.finished += 1
        if reason == "cancelled":
            self.stats.cancelled += 1

    def _fail(self, row: _Row, exc: BaseException) -> None:
        if not isinstance(exc, GenerationFailed | SteerError | EngineStopped):
            wrapped = GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}")
            wrapped.__cause__ = exc
            exc = wrapped
        row.handle._put(_ERROR, exc)
        self.stats.finished += 1
        self.stats.failed += 1

    def _fail_batch(self, exc: BaseException) -> None:
        batch, self._batch = self._batch, None
        self._remove_hooks()
        if batch is not None:
            for row in batch.rows:
                self._fail(row, exc)
        self.stats.active_rows = 0

    def _fail_everything(self, exc: BaseException) -> None:
        if self.running:
            return  # the thread still owns its state
        self._fail_batch(exc)
        while self._backlog:
            self._fail(self._backlog.popleft(), exc)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _ScoreJob):
                item.error = exc
                item.done.set()
            elif isinstance(item, _Row):
                self._fail(item, exc)

    def _run_score(self, job: _ScoreJob) -> None:
        # answer_distributions attaches its own hooks; the engine's must be off meanwhile.
        self._remove_hooks()
        try:
            job.result = answer_distributions(self.lm, job.items, job.steering)
        except Exception as exc:
            job.error = exc
        finally:
            job.done.set()
