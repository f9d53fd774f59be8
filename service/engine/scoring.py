"""The score scheduler: score requests share the engine's loop with generation.

An idle engine reads score requests flat out through the one answer reader
(`steer_core.prompts.read_answers`), `score_batch_size` questions a call. While rows are decoding, questions
ride the decode batch instead: a riding question (`Rider`) joins with an empty KV cache and feeds its prompt
one token per decode step, as one more row of the step's forward call, and leaves with its answer
distribution when its last prompt token has run. A forward call's fixed cost (every block's kernels, Python
dispatch) is paid once for streams and riders together, so a rider costs a step only its own row's compute;
riders are added while they cost at most `score_share` of a plain step (measured: a plain step's time for
the number of rows decoding, and each rider's extra time). Each row of a step carries where its own prompt
ends, so a rider's prompt positions are steered as in a whole read. Steering that needs the whole prompt in
one call (`steers_in_chunks` is False: COLD-FD, COLD-Kernel), and a profile with a question lean (it reads
the whole prompt's states, `steer_core.question_lean`), read their questions whole between decode steps,
sized to take `score_share` of the engine's time; decode steps run until they have used the rest. Such a
read also returns each question's lean (`Scored.leans`); the request thread applies the calibrations
(`service.engine.blend`).

Engine thread only, except `ScoreJob.done` and its results, which the request thread waits on.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from service.engine.types import AppliedProfile, DeadlineExceeded, EngineStats, SteeringPlan
from steer_core.data import OpinionItem
from steer_core.models import LanguageModel
from steer_core.prompts import option_log_probs, prompt_token_ids, read_answers
from steer_core.question_lean import QuestionLean
from steer_core.steering import RowSteering


@dataclass(eq=False)
class ScoreJob:
    """A score request: its items and plans, and what the engine resolved and read of them so far."""

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


@dataclass(eq=False)
class Rider:
    """A question of a score request riding the decode batch: it feeds one prompt token per step."""

    job: ScoreJob
    index: int  # the item's index in the job
    prompt_ids: list[int]
    steering: RowSteering | None
    fed: int = 0  # prompt tokens already in the KV cache

    def prompt_end(self, width: int) -> int:
        """Where the prompt ends, in a decode call's absolute positions (`width` columns, the token being fed
        in the last)."""
        return width - 1 - self.fed + len(self.prompt_ids)

    def give_back(self) -> None:
        """Give the rider's question back to its request, to be read again."""
        if not self.job.done.is_set():
            self.job.unread.appendleft(self.index)


class ScoreScheduler:
    """The engine's score requests: which questions ride the next decode step, which are read whole and
    when, and each request's end. `leave_queue` takes a job out of the engine's queue count."""

    def __init__(self, lm: LanguageModel, stats: EngineStats, leave_queue: Callable[[ScoreJob], None],
                 batch_size: int, share: float) -> None:
        self.lm = lm
        self.stats = stats
        self._leave_queue = leave_queue
        self.batch_size = batch_size
        self.share = share
        self.jobs: deque[ScoreJob] = deque()
        self.debt = 0.0  # seconds of decoding owed before the next whole read
        # Moving averages that size scoring: seconds of one decode step and of reading one question whole;
        # seconds of a decode step without riders, by the number of rows decoding; a rider's extra seconds.
        self._decode_seconds: float | None = None
        self._row_seconds: float | None = None
        self._plain_step_seconds: dict[int, float] = {}
        self._rider_seconds: float | None = None

    # ---- requests ------------------------------------------------------------------------------------

    def add(self, job: ScoreJob) -> None:
        self.jobs.append(job)

    def end(self, job: ScoreJob, exc: BaseException | None = None) -> None:
        """End `job` (with `exc`, or its results), wherever it is."""
        self._leave_queue(job)
        job.error = exc
        job.done.set()

    def finish(self, job: ScoreJob, exc: BaseException | None = None) -> None:
        """End a scheduled job."""
        if job in self.jobs:
            self.jobs.remove(job)
        self.end(job, exc)

    def fail_all(self, exc: BaseException) -> None:
        while self.jobs:
            self.end(self.jobs.popleft(), exc)

    def expire(self) -> None:
        now = time.monotonic()
        for job in [job for job in self.jobs if now > job.deadline]:
            self.finish(job, DeadlineExceeded("scoring did not finish before its deadline"))

    def record(self, job: ScoreJob, distributions: Mapping[int, np.ndarray]) -> None:
        job.results.update(distributions)
        if len(job.results) == len(job.items):
            self.finish(job)

    # ---- riders --------------------------------------------------------------------------------------

    def riders(self, generating: int, riding: int) -> list[Rider]:
        """Unread questions to ride the running batch (`generating` rows decoding, `riding` riders aboard), as
        many as keep their cost within `score_share`."""
        plain = self._plain_step_seconds.get(generating)
        # Unmeasured for this many rows: add none, so that a step without riders measures it.
        room = (scoring_rows(plain, self._rider_seconds, self.share, self.batch_size)
                if plain is not None else riding) - riding
        if room <= 0:
            return []
        riders: list[Rider] = []
        for job in self.jobs:
            for index in list(itertools.islice((i for i in job.unread if job.rideable[i]), room - len(riders))):
                job.unread.remove(index)
                riders.append(Rider(job=job, index=index, steering=job.steering[index],
                                    prompt_ids=prompt_token_ids(self.lm.tokenizer, job.items[index])))
            if len(riders) >= room:
                break
        return riders

    def ride(self, rider: Rider, logits: Tensor, failure: Exception | None) -> bool:
        """Advance `rider` past the token it fed; True while it has prompt tokens left to feed. After its last
        one, the logits are its answer's: record its distribution."""
        job = rider.job
        if job.done.is_set():  # its request ended (deadline, error)
            return False
        if failure is not None:
            self.finish(job, failure)
            return False
        rider.fed += 1
        if rider.fed < len(rider.prompt_ids):
            return True
        self.answer(rider, logits)
        return False

    def answer(self, rider: Rider, logits: Tensor) -> None:
        """Record a rider's distribution from the logits after its last prompt token."""
        item = rider.job.items[rider.index]
        probs = option_log_probs(self.lm, logits.unsqueeze(0).float(), [item]).exp().cpu().numpy()[0]
        self.stats.score_riders += 1
        self.record(rider.job, {rider.index: probs[:len(item.options)].astype(np.float64)})

    def stepped(self, generating: int, riding: int, seconds: float) -> None:
        """A decode step of `generating` rows and `riding` riders took `seconds`."""
        self.debt -= seconds
        self._decode_seconds = moving_average(self._decode_seconds, seconds)
        plain = self._plain_step_seconds.get(generating)
        if riding == 0:
            self._plain_step_seconds[generating] = moving_average(plain, seconds)
        elif plain is not None:
            self._rider_seconds = moving_average(self._rider_seconds, max(0.0, seconds - plain) / riding)

    # ---- whole reads ---------------------------------------------------------------------------------

    def next_read(self, decoding: bool) -> tuple[ScoreJob, list[int]] | None:
        """The next whole read, when no decoding is owed: unread questions of the oldest request that has some
        (while rows decode, only those that cannot ride)."""
        if not decoding:
            self.debt = 0.0  # nobody is waiting for tokens: score flat out
        if self.debt > 0:
            return None
        rows = scoring_rows(self._decode_seconds, self._row_seconds, self.share, self.batch_size) if decoding \
            else self.batch_size
        for job in self.jobs:
            picked = list(itertools.islice((i for i in job.unread if not (decoding and job.rideable[i])), rows))
            if picked:
                return job, picked
        return None

    def read(self, job: ScoreJob, indexes: list[int], decoding: bool) -> None:
        """Read the questions `indexes` of `job` whole, in one call (the engine's hooks off: `read_answers`
        attaches its own); while rows decode, they are owed the rest of the time it took."""
        spent = self._read(job, indexes)
        if decoding:
            self.debt += spent * (1.0 - self.share) / self.share

    def _read(self, job: ScoreJob, indexes: list[int]) -> float:
        for index in indexes:
            job.unread.remove(index)
        items = [job.items[i] for i in indexes]
        steering = [job.steering[i] for i in indexes]
        probes = [job.question_leans[i] for i in indexes]
        began = time.perf_counter()
        try:
            # One order as asked: a caller that wants both orders asks for both (as /v1/score does).
            read = read_answers(self.lm, items, steering if any(steering) else None,
                                sorted({p.layer for row in probes for p in row if p is not None}),
                                batch_size=len(items), orders=1)
        except Exception as exc:
            self.finish(job, exc)
            return time.perf_counter() - began
        distributions = read.distributions
        for k, (index, row) in enumerate(zip(indexes, probes, strict=True)):
            if any(row):
                job.leans[index] = tuple(None if p is None else float(p.leans(read.states[p.layer][k:k + 1])[0])
                                         for p in row)
        spent = time.perf_counter() - began
        self._row_seconds = moving_average(self._row_seconds, spent / len(items))
        self.stats.score_batches += 1
        self.stats.score_rows = len(items)
        self.record(job, dict(zip(indexes, distributions, strict=True)))
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


def moving_average(average: float | None, value: float, weight: float = 0.25) -> float:
    """An exponential moving average (the first value starts it)."""
    return value if average is None else (1.0 - weight) * average + weight * value
