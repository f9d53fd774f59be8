"""The generation engine: one thread owns the model and every tensor, and runs every request of the process.

Request threads never touch torch, nor import this module: they reach the engine through
`service.engine.client`, which creates it on first use. They tokenize (on their own copy of the tokenizer,
`service.engine.decoding.RequestTokenizer`), then hand the engine a prompt, sampling parameters and a
plain-data steering plan (`service.engine.types.SteeringPlan`: artifact digests, weights, positions) with
`submit` or `score`, and read what comes back from a `GenerationHandle`.

The engine thread resolves plans: it loads each profile through the profile source (the service's profile
cache: LRU, Redis, artifact store), builds its intervention for the served model, composes the blend,
and keeps both in one bounded `InterventionCache`. A plan that cannot steer fails its own request
(`SteeringRejected`) before it takes a batch slot.

Batching is dynamic: when the engine is idle it waits at most `batch_wait_ms` after the first arrival to
fill a batch; while a batch runs, new requests are prefilled between decode steps and concatenated into it
(their KV caches left-padded to a common length, `service.engine.batch`), up to `max_batch_size` rows. Every
row keeps its own steering through `SteeringHooks.plan`; a batch with no steered row runs with no hooks at
all. A row that finishes (stop token, stop string, `max_tokens`: `service.engine.decoding`), is cancelled
(client gone), passes its deadline or fails leaves the batch at the next step; an intervention that raises
fails only the rows it steers.

Scoring shares the loop (`service.engine.scoring`): questions ride decode steps, or are read whole between
them, within `score_share` of the engine's time; an idle engine reads them flat out.

A row that asks for log-probabilities (`SamplingParams.top_logprobs`) gets them from the logits it samples
from, steering applied; the other rows of its batch pay nothing for it.

At most `max_queue` requests wait for the engine; beyond that `submit` and `score` raise `EngineBusy` at
once. `stop` ends every request it has admitted with a result or an error.
"""

from __future__ import annotations

import inspect
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from service.engine.batch import Batch, Row
from service.engine.decoding import (
    Detokenizer,
    RequestTokenizer,
    context_length,
    sample,
    stop_token_ids,
    token_logprob,
)
from service.engine.decoding import piece_bytes as _piece_bytes
from service.engine.interventions import InterventionCache, ProfileSource
from service.engine.scoring import Rider, ScoreJob, ScoreScheduler, scoring_rows
from service.engine.types import (
    DONE,
    ERROR,
    STARTED,
    AppliedProfile,
    DeadlineExceeded,
    EngineBusy,
    EngineStats,
    EngineStopped,
    GenerationFailed,
    GenerationHandle,
    GenerationResult,
    PlannedProfile,
    SamplingParams,
    Scored,
    SteeringPlan,
    SteeringRejected,
    TextChunk,
    TokenLogprob,
)
from steer_core.data import OpinionItem
from steer_core.errors import SteerError
from steer_core.models import LanguageModel
from steer_core.steering import RowSteering, SteeringHooks, steers_in_chunks

__all__ = ["AppliedProfile", "DeadlineExceeded", "EngineBusy", "EngineStats", "EngineStopped", "GenerationEngine",
           "GenerationFailed", "GenerationHandle", "GenerationResult", "InterventionCache", "PlannedProfile",
           "ProfileSource", "SamplingParams", "Scored", "SteeringPlan", "SteeringRejected", "TextChunk",
           "TokenLogprob", "_piece_bytes", "context_length", "scoring_rows"]

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
        self._stop_ids = stop_token_ids(lm)
        self._text = Detokenizer(lm, self._stop_ids)
        self._tokenizer = RequestTokenizer(lm.tokenizer)
        self._scores = ScoreScheduler(lm, self.stats, self._leave_queue, self.score_batch_size, score_share)
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._backlog: deque[Row] = deque()
        self._batch: Batch | None = None
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
        return self._tokenizer.chat(messages)

    def score_prompt_tokens(self, item: OpinionItem) -> int:
        """Length in tokens of the prompt the answer reader builds for `item`."""
        return self._tokenizer.score_prompt_tokens(item)

    def token_bytes(self, tokens: Sequence[int]) -> list[bytes]:
        """The raw UTF-8 bytes each token stands for (a token may hold part of a character)."""
        return self._tokenizer.token_bytes(tokens)

    def _enqueue(self, item: Row | ScoreJob) -> None:
        with self._lock:
            self._start_locked()
            if self.stats.queued >= self.max_queue:
                retry = 1 + self.stats.queued // self.max_batch_size
                raise EngineBusy(f"the generation engine has {self.stats.queued} requests waiting; retry later",
                                 retry_after=retry)
            self.stats.queued += 1
            self._inbox.put(item)

    def _leave_queue(self, item: Row | ScoreJob) -> None:
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
        row = Row(handle=handle, prompt_ids=[int(t) for t in prompt_ids], sampling=sampling,
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
        job = ScoreJob(items=list(items), plans=plans, deadline=self._deadline(timeout),
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
        self._scores.expire()
        if self._batch is not None:
            generating = self._generating()
            riders = self._scores.riders(generating, len(self._batch.rows) - generating)
            if riders:
                self._batch.board(riders, self.lm.device)
            riding = len(self._batch.rows) - generating
            started = time.perf_counter()
            self._decode()
            self._scores.stepped(generating, riding, time.perf_counter() - started)
            if self._batch is not None and self._generating() == 0:
                self._land_riders()
        read = self._scores.next_read(decoding=self._batch is not None)
        if read is not None:
            self._remove_hooks()  # read_answers attaches its own hooks; the engine's must be off meanwhile
            self._scores.read(*read, decoding=self._batch is not None)
        if self._batch is None and not self._scores.jobs:
            self._remove_hooks()  # idle: the model is left unsteered
        self.stats.active_rows = self._generating()
        return True

    def _generating(self) -> int:
        """Generation rows in the running batch (riders not counted)."""
        return sum(isinstance(r, Row) for r in self._batch.rows) if self._batch is not None else 0

    def _admit(self) -> tuple[list[Row], bool]:
        """Take what arrived (resolving its steering), and the rows that fit into the batch."""
        running = self._generating()
        room = self.max_batch_size - running
        stop = False

        def take(item: Any) -> None:
            nonlocal stop
            if item is _STOP:
                stop = True
            elif isinstance(item, ScoreJob):
                if self._resolve_job(item):
                    self._scores.add(item)
            elif self._resolve_row(item):
                self._backlog.append(item)

        if running == 0 and not self._backlog and not self._scores.jobs:
            take(self._inbox.get())  # idle: sleep until something arrives
            deadline = time.monotonic() + self.batch_wait
            # Bounded wait: give concurrent requests a moment to join the first batch.
            while not stop and not self._scores.jobs and len(self._backlog) < room:
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
        rows: list[Row] = []
        kept: deque[Row] = deque()
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

    def _resolve_row(self, row: Row) -> bool:
        try:
            row.steering, applied = self.interventions.resolve(row.plan)
        except Exception as exc:
            self._reject(row, exc)
            return False
        row.handle.put(STARTED, applied)
        return True

    def _resolve_job(self, job: ScoreJob) -> bool:
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
            self._scores.end(job, exc)
            return False
        return True

    def _reject(self, row: Row, exc: BaseException) -> None:
        self._leave_queue(row)
        self.stats.rejected += 1
        row.handle.put(ERROR, exc if isinstance(exc, SteeringRejected | SteerError) else _wrapped(exc))

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

    def _steering_of(self, rows: Sequence[Row | Rider]) -> list[RowSteering | None] | None:
        plans = [row.steering for row in rows]
        return plans if any(plans) else None

    def _prefill(self, rows: list[Row]) -> None:
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
        batch = Batch(rows=[*rows], cache=getattr(out, self._cache_kwarg), mask=mask)
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
        prompt_ends = [r.prompt_end(width) if isinstance(r, Rider) else width - len(r.generated)
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

    def _advance(self, batch: Batch, logits: Tensor) -> bool:
        """Sample each row's next token, send its text, drop finished rows. False when none is left."""
        failures = self._hook_failures
        self._hook_failures = {}
        logits = logits.float()
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        greedy = logits.argmax(dim=-1).tolist()
        # Log-probabilities for the rows that asked for them only.
        asking = [i for i, row in enumerate(batch.rows)
                  if isinstance(row, Row) and row.sampling.top_logprobs is not None]
        log_probs = dict(zip(asking, torch.log_softmax(logits[asking], dim=-1).cpu(), strict=True)) if asking \
            else {}
        now = time.monotonic()
        on_cpu = None
        keep: list[int] = []
        nxt: list[int] = []
        for i, row in enumerate(batch.rows):
            if isinstance(row, Rider):
                if self._scores.ride(row, logits[i], failures.get(i)):
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
                    token = sample(on_cpu[i], row)
                entry = token_logprob(log_probs[i], token, row.sampling.top_logprobs or 0) \
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

    def _land_riders(self) -> None:
        """The streams have ended and only riders are left: run the rest of their prompts in one call on their
        caches (each row's rest right-aligned, padding between its cache and its rest masked out), so the
        positions they fed are not run again."""
        batch, self._batch = self._batch, None
        assert batch is not None
        riders = [r for r in batch.rows if isinstance(r, Rider)]
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
                rider.give_back()
            return
        failures, self._hook_failures = self._hook_failures, {}
        for i, rider in enumerate(riders):
            if rider.job.done.is_set():
                continue
            if i in failures:
                self._scores.finish(rider.job, failures[i])
            else:
                self._scores.answer(rider, out.logits[i, -1, :])

    # ---- how rows end --------------------------------------------------------------------------------

    def _emit(self, row: Row, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record `token` (and its `logprob` entry) for `row`, send what text is safe to send; True when the
        row is finished. A stop token is no part of the text, nor of the log-probabilities."""
        self.stats.tokens += 1
        ending = self._text.add(row, token, logprob)
        if ending is None:
            return False
        self._finish(row, *ending)
        return True

    def _finish(self, row: Row, reason: str, text: str | None = None) -> None:
        self._leave_queue(row)
        row.handle.put(DONE, self._text.result(row, reason, text))
        self.stats.finished += 1
        if reason == "cancelled":
            self.stats.cancelled += 1

    def _fail(self, row: Row, exc: BaseException) -> None:
        self._leave_queue(row)
        if not isinstance(exc, GenerationFailed | SteerError | EngineStopped | DeadlineExceeded):
            exc = _wrapped(exc)
        row.handle.put(ERROR, exc)
        self.stats.finished += 1
        self.stats.failed += 1

    def _expire(self, row: Row) -> None:
        self.stats.expired += 1
        self._fail(row, DeadlineExceeded("the request did not finish before its deadline"))

    def _fail_batch(self, exc: BaseException) -> None:
        batch, self._batch = self._batch, None
        self._remove_hooks()
        if batch is not None:
            for row in batch.rows:
                if isinstance(row, Rider):
                    row.give_back()
                else:
                    self._fail(row, exc)
        self.stats.active_rows = 0

    def _shutdown(self, admitted: list[Row]) -> None:
        """The stop arrived: end every request this thread holds, those admitted in this round included."""
        stopped = EngineStopped("the generation engine was stopped")
        for row in admitted:
            self._fail(row, stopped)
        self._fail_held(stopped)

    def _fail_held(self, exc: BaseException) -> None:
        self._fail_batch(exc)
        while self._backlog:
            self._fail(self._backlog.popleft(), exc)
        self._scores.fail_all(exc)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, ScoreJob):
                self._scores.end(item, exc)
            elif isinstance(item, Row):
                self._fail(item, exc)

    def _fail_everything(self, exc: BaseException) -> None:
        if self.running:
            return  # the thread still owns its state
        self._fail_held(exc)


def _wrapped(exc: BaseException) -> GenerationFailed:
    wrapped = GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped
