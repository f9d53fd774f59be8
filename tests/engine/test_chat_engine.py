"""The generation engine on tiny random models: batching never changes a row's tokens, each row keeps its
own steering (every method, blends), plans are resolved on the engine thread only, failures and
cancellations stay in their row, scoring interleaves with decoding, the queue is bounded, and a stop
ends every request it admitted."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time

import numpy as np
import pytest
import torch
from support import FIXTURES, Gate, make_tiny

from service.engine.engine import (
    DeadlineExceeded,
    EngineBusy,
    EngineStopped,
    GenerationEngine,
    GenerationFailed,
    PlannedProfile,
    SamplingParams,
    SteeringPlan,
    SteeringRejected,
    _piece_bytes,
    scoring_rows,
)
from service.engine.interventions import InterventionCache
from steer_core.data import load_items
from steer_core.errors import SteerError
from steer_core.methods import METHODS, get_method, intervention
from steer_core.profile import Profile
from steer_core.prompts import answer_distributions, read_answers
from steer_core.question_lean import QuestionLean

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
CHATS = ["Hello there", "Tell me a long story about a dog who lived near the sea and liked to swim", "Why?"]
LAYER = 2


def _vector(lm, seed: int, scale: float = 4.0) -> torch.Tensor:
    return scale * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(seed))


class Profiles:
    """Profiles by artifact digest, read the way the service's profile cache reads them (bytes parsed per
    load); records the thread of every load."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.objects: dict[str, Profile] = {}
        self.threads: list[int] = []

    def __call__(self, digest: str) -> Profile:
        self.threads.append(threading.get_ident())
        if digest in self.objects:
            return self.objects[digest]
        return Profile.from_bytes(self.data[digest])

    def add_unstorable(self, profile: Profile) -> str:
        """A profile that `to_bytes` would refuse (non-finite tensors), as a corrupted store could serve."""
        digest = hashlib.sha256(repr(profile).encode()).hexdigest()
        self.objects[digest] = profile
        return digest

    def add(self, profile: Profile) -> str:
        data = profile.to_bytes()
        digest = hashlib.sha256(data).hexdigest()
        self.data[digest] = data
        return digest

    def vector(self, lm, layer: int, positions: str, vector: torch.Tensor) -> str:
        """A DiffMean profile whose displacement is `vector` (a constant shift)."""
        return self.add(Profile(method="diffmean", model_name=lm.name, model_fingerprint=lm.fingerprint,
                                layer=layer, positions=positions, strength=1.0, tensors={"vector": vector}))


def plan(*entries: str | tuple[str, float]) -> SteeringPlan:
    """A plan of digests, each with weight 1 or (digest, weight)."""
    return SteeringPlan(tuple(PlannedProfile(e) if isinstance(e, str) else PlannedProfile(e[0], e[1])
                              for e in entries))


def _prompt(engine: GenerationEngine, text: str) -> list[int]:
    return engine.tokenize_chat([{"role": "user", "content": text}])


def _hooks(lm) -> set[tuple[str, int]]:
    """Every hook on the model and its blocks (transformers installs some of its own: compare sets)."""
    out = {("model-pre", k) for k in lm.model._forward_pre_hooks}
    for i, block in enumerate(lm.blocks):
        out |= {(f"block{i}", k) for k in block._forward_hooks}
        out |= {(f"block{i}-pre", k) for k in block._forward_pre_hooks}
    return out


@pytest.fixture
def profiles():
    return Profiles()


@pytest.fixture
def engine(tiny_lm, profiles):
    before = _hooks(tiny_lm)
    eng = GenerationEngine(tiny_lm, profiles=profiles, max_batch_size=8, batch_wait_ms=30, max_new_tokens=64)
    yield eng
    eng.stop()
    assert _hooks(tiny_lm) == before, "the engine left hooks behind"


def _solo(engine, prompt, steering=None, sampling=GREEDY):
    return engine.generate(prompt, sampling, steering, timeout=60).token_ids


def test_concurrent_rows_with_different_steering_get_the_tokens_they_get_alone(engine, tiny_lm, profiles):
    prompts = [_prompt(engine, c) for c in CHATS]
    steering = [plan(profiles.vector(tiny_lm, LAYER, "prompt", _vector(tiny_lm, 1))),
                None,
                plan(profiles.vector(tiny_lm, 1, "all", _vector(tiny_lm, 2)),
                     profiles.vector(tiny_lm, 3, "last", _vector(tiny_lm, 3)))]
    alone = [_solo(engine, p, s) for p, s in zip(prompts, steering, strict=True)]
    assert alone[0] != _solo(engine, prompts[0]), "the steering should change the greedy tokens"
    handles = [engine.submit(p, GREEDY, s) for p, s in zip(prompts, steering, strict=True)]
    together = [h.result(60).token_ids for h in handles]
    assert together == alone
    assert engine.stats.largest_batch == 3


def test_a_request_joining_a_running_batch_gets_its_own_tokens(engine, tiny_lm, profiles):
    long_run = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    p0, p1 = _prompt(engine, CHATS[0]), _prompt(engine, CHATS[1])
    s1 = plan(profiles.vector(tiny_lm, LAYER, "all", _vector(tiny_lm, 4)))
    alone0, alone1 = _solo(engine, p0, sampling=long_run), _solo(engine, p1, s1)
    first = engine.submit(p0, long_run)
    chunks = first.chunks(60)
    next(chunks)  # the first row is decoding
    second = engine.submit(p1, GREEDY, s1)
    assert second.result(60).token_ids == alone1
    assert first.result(60).token_ids == alone0
    assert engine.stats.largest_batch == 2


@pytest.mark.parametrize("family", ["mistral", "gemma", "gpt2", "gpt_neox"])
def test_batching_is_exact_for_every_family(family):
    lm = make_tiny(family, seed=1)
    profiles = Profiles()
    engine = GenerationEngine(lm, profiles=profiles, max_batch_size=4, batch_wait_ms=30)
    try:
        prompts = [_prompt(engine, c) for c in CHATS]
        steering = [None, plan(profiles.vector(lm, 1, "prompt", _vector(lm, 5))), None]
        alone = [_solo(engine, p, s) for p, s in zip(prompts, steering, strict=True)]
        handles = [engine.submit(p, GREEDY, s) for p, s in zip(prompts, steering, strict=True)]
        assert [h.result(60).token_ids for h in handles] == alone
        assert engine.stats.largest_batch == 3
    finally:
        engine.stop()


def test_zero_weight_blend_generates_the_unsteered_tokens(engine, tiny_lm, profiles):
    prompt = _prompt(engine, CHATS[1])
    blend = plan((profiles.vector(tiny_lm, LAYER, "prompt", _vector(tiny_lm, 6)), 0.0),
                 (profiles.vector(tiny_lm, 1, "all", _vector(tiny_lm, 7)), 0.0))
    steps_before = engine.stats.steered_steps
    assert _solo(engine, prompt, blend) == _solo(engine, prompt)
    assert engine.stats.steered_steps > steps_before, "the zero blend must really run through the hooks"


def test_the_unsteered_path_registers_no_hooks(engine, tiny_lm):
    before = _hooks(tiny_lm)
    handle = engine.submit(_prompt(engine, CHATS[0]), SamplingParams(max_tokens=30, temperature=0.0,
                                                                     ignore_eos=True))
    next(handle.chunks(60))
    assert _hooks(tiny_lm) == before
    handle.result(60)
    assert engine.stats.steered_steps == 0


def _broken_kernel(lm) -> Profile:
    """A linear-kernel COLD profile whose anchors have the wrong width: its displacement raises, as a
    corrupt or buggy profile would."""
    return Profile(method="cold_kernel", model_name=lm.name, model_fingerprint=lm.fingerprint, layer=LAYER,
                   positions="prompt", strength=1.0,
                   tensors={"anchors": torch.randn(3, lm.hidden_size + 1), "grads": torch.randn(3, lm.hidden_size)},
                   params={"kernel": "linear", "loss": "ce", "unit_scale": 1.0})


def test_a_failing_row_fails_only_its_own_request(engine, tiny_lm, profiles):
    good = _prompt(engine, CHATS[1])
    shift = plan(profiles.vector(tiny_lm, LAYER, "prompt", _vector(tiny_lm, 8)))
    alone = _solo(engine, good, shift)
    bad = engine.submit(_prompt(engine, CHATS[0]), GREEDY, plan(profiles.add(_broken_kernel(tiny_lm))))
    infinite = engine.submit(_prompt(engine, CHATS[2]), GREEDY,
                             plan(profiles.add_unstorable(dataclasses.replace(
                                 profiles(shift.profiles[0].digest),
                                 tensors={"vector": torch.full((tiny_lm.hidden_size,), float("inf"))}))))
    fine = engine.submit(good, GREEDY, shift)
    with pytest.raises(GenerationFailed, match="shapes"):
        bad.result(60)
    with pytest.raises(GenerationFailed, match="non-finite"):
        infinite.result(60)
    assert fine.result(60).token_ids == alone
    assert engine.stats.failed == 2
    assert engine.generate(good, GREEDY, shift, timeout=60).token_ids == alone  # the engine goes on


def test_plans_that_cannot_steer_are_refused_before_they_run(engine, tiny_lm, profiles):
    prompt = _prompt(engine, CHATS[0])
    other_model = profiles.add(Profile(method="diffmean", model_name="x", model_fingerprint="0" * 16, layer=LAYER,
                                       positions="prompt", strength=1.0, tensors={"vector": _vector(tiny_lm, 1)}))
    deep = profiles.vector(tiny_lm, 99, "prompt", _vector(tiny_lm, 1))
    cases = [(SteeringPlan((PlannedProfile("f" * 64, field="steering.profiles[0].id"),)), "unavailable",
              "steering.profiles[0].id"),
             (SteeringPlan((PlannedProfile(other_model, field="model"),)), "model_mismatch", "model"),
             (plan(deep), "model_mismatch", "steering")]
    for bad, reason, field in cases:
        handle = engine.submit(prompt, GREEDY, bad)
        with pytest.raises(SteeringRejected) as info:
            handle.started(60)
        assert (info.value.reason, info.value.field) == (reason, field)
    assert engine.stats.rejected == 3 and engine.stats.prefills == 0 and engine.queue_depth() == 0


def test_cancel_frees_the_slot(engine):
    handle = engine.submit(_prompt(engine, CHATS[0]), SamplingParams(max_tokens=64, temperature=0.0,
                                                                     ignore_eos=True))
    next(handle.chunks(60))
    _wait(lambda: engine.stats.active_rows == 1)
    handle.cancel()
    result = handle.result(60)
    assert result.finish_reason == "cancelled" and result.completion_tokens < 64
    _wait(lambda: engine.stats.active_rows == 0)
    assert engine.stats.cancelled == 1


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_stop_strings_max_tokens_and_streamed_text(engine):
    prompt = _prompt(engine, CHATS[1])
    free = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), timeout=60)
    assert free.finish_reason == "length" and free.completion_tokens == 24
    text = free.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3
    handle = engine.submit(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                  stop=("never in this text \u2603", stop)))
    streamed = "".join(c.text for c in handle.chunks(60))
    result = handle.result()
    assert result.finish_reason == "stop"
    assert result.text == text[:text.index(stop)] == streamed


def test_a_row_with_log_probabilities_batched_with_rows_without_equals_that_row_alone(engine, tiny_lm, profiles):
    asking = dataclasses.replace(GREEDY, top_logprobs=5)
    prompts = [_prompt(engine, c) for c in CHATS]
    shift = plan(profiles.vector(tiny_lm, LAYER, "all", _vector(tiny_lm, 5)))
    requests = [(prompts[0], asking, shift), (prompts[1], GREEDY, None), (prompts[2], GREEDY, shift)]
    alone = [engine.generate(p, s, st, timeout=60) for p, s, st in requests]
    handles = [engine.submit(p, s, st) for p, s, st in requests]
    together = [h.result(60) for h in handles]
    assert engine.stats.largest_batch == 3
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert together[1].logprobs is None and together[2].logprobs is None  # the others asked for none
    mine, solo = together[0].logprobs, alone[0].logprobs
    assert [e.token for e in mine] == together[0].token_ids
    assert [[t for t, _ in e.top] for e in mine] == [[t for t, _ in e.top] for e in solo]
    torch.testing.assert_close(torch.tensor([[e.logprob, *(v for _, v in e.top)] for e in mine]),
                               torch.tensor([[e.logprob, *(v for _, v in e.top)] for e in solo]))
    for entry in mine:  # greedy: the chosen token is the most likely one, and the list is as long as asked
        assert len(entry.top) == 5 and entry.top[0] == (entry.token, entry.logprob)
        assert entry.logprob <= 0 and [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
    unsteered = engine.generate(prompts[0], asking, timeout=60).logprobs
    assert unsteered is not None and unsteered[0].logprob != mine[0].logprob  # the steered distribution


def test_streamed_log_probabilities_follow_their_text(engine):
    prompt = _prompt(engine, CHATS[1])
    asking = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, top_logprobs=2)
    free = engine.generate(prompt, asking, timeout=60)
    assert free.logprobs is not None and len(free.logprobs) == free.completion_tokens == 24
    assert b"".join(engine.token_bytes([e.token for e in free.logprobs])).decode() == free.text
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    handle = engine.submit(prompt, dataclasses.replace(asking, stop=(stop,)))
    chunks = list(handle.chunks(60))
    result = handle.result()
    assert result.text == free.text[:free.text.index(stop)] == "".join(c.text for c in chunks)
    # The tokens of the text, the one the stop string cut included, each sent with the chunk completing it.
    assert [e for c in chunks for e in c.logprobs] == result.logprobs
    assert result.logprobs is not None and result.logprobs == free.logprobs[:len(result.logprobs)]
    spelled = engine.token_bytes([e.token for e in result.logprobs])
    assert b"".join(spelled).startswith(result.text.encode())
    assert len(b"".join(spelled[:-1])) < len(result.text.encode())  # the last token begins in the text
    text, tokens = b"", []
    for chunk in chunks[:-1]:  # a token is sent once all its text is
        text += chunk.text.encode()
        tokens += [e.token for e in chunk.logprobs]
        assert text.startswith(b"".join(engine.token_bytes(tokens)))


def test_token_bytes_of_byte_level_and_sentencepiece_vocabularies(engine):
    ids = engine.tokenize_chat([{"role": "user", "content": "Café ☃"}])
    assert b"".join(engine.token_bytes(ids)).decode().endswith("user\nCafé ☃<|im_end|>\n<|im_start|>assistant\n")
    # SentencePiece spells bytes as <0xNN> and spaces as U+2581.
    assert [_piece_bytes(p, None) for p in ("\u2581Caf", "<0xC3>", "<0xA9>")] == [b" Caf", b"\xc3", b"\xa9"]


def test_seeded_sampling_is_reproducible_and_top_p_restricts(engine):
    prompt = _prompt(engine, CHATS[0])
    sampled = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    a, b = _solo(engine, prompt, sampling=sampled), _solo(engine, prompt, sampling=sampled)
    assert a == b
    assert a != _solo(engine, prompt, sampling=SamplingParams(max_tokens=10, temperature=1.0, seed=8,
                                                               ignore_eos=True))
    # top_p so small that only the most likely token survives: sampling becomes greedy.
    assert _solo(engine, prompt, sampling=SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-9, seed=3,
                                                         ignore_eos=True)) == \
        _solo(engine, prompt, sampling=SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))


def test_a_temperature_too_small_to_divide_by_samples_the_most_likely_token(engine):
    prompt = _prompt(engine, CHATS[0])
    greedy = _solo(engine, prompt, sampling=SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    for tiny in (1e-182, 5e-324):  # logits / tiny overflow to inf: softmax of inf - inf would be NaN
        assert _solo(engine, prompt, sampling=SamplingParams(max_tokens=10, temperature=tiny, seed=1,
                                                             ignore_eos=True)) == greedy


def test_bad_requests_name_the_field(engine):
    prompt = _prompt(engine, CHATS[0])
    with pytest.raises(SteerError) as info:
        engine.submit(prompt, SamplingParams(max_tokens=65))
    assert info.value.field == "max_tokens"
    with pytest.raises(SteerError) as info:
        engine.submit(prompt * 400, GREEDY)
    assert info.value.field == "prompt"
    with pytest.raises(SteerError) as info:
        engine.submit(prompt, SamplingParams(max_tokens=8, temperature=float("nan")))
    assert info.value.field == "temperature"


def test_scores_on_the_engine_thread_equal_the_answer_reader(engine, tiny_lm, profiles):
    items = load_items(FIXTURES / "opinions_group_urban.jsonl")[:3]
    vector = _vector(tiny_lm, 9)
    shift = plan(profiles.vector(tiny_lm, LAYER, "prompt", vector))
    direct = [intervention(profiles(shift.profiles[0].digest), tiny_lm)]
    want = answer_distributions(tiny_lm, items, [direct, None, direct], orders=1)  # the engine reads as asked
    # generation keeps running while scores are read between its steps
    running = engine.submit(_prompt(engine, CHATS[0]), SamplingParams(max_tokens=40, temperature=0.0,
                                                                      ignore_eos=True), shift)
    got = engine.score(items, [shift, None, shift], timeout=60)
    running.result(60)
    for g, w in zip(got.distributions, want, strict=True):
        assert g.tolist() == pytest.approx(w.tolist(), abs=1e-6)
    assert [[a.layer for a in applied] for applied in got.applied] == [[LAYER], [], [LAYER]]


def test_a_scoring_batch_between_decode_steps_takes_the_scoring_share_of_a_step():
    # 40 ms decode steps, 5 ms a question, a quarter of the time for scoring: 40 * 0.25 / 0.75 = 13.3 ms,
    # two questions a batch (each token then waits one step and a third).
    assert scoring_rows(0.040, 0.005, 0.25, 16) == 2
    assert scoring_rows(0.040, 0.001, 0.25, 16) == 13
    assert scoring_rows(0.040, 0.0001, 0.25, 16) == 16  # at most the configured batch
    assert scoring_rows(0.040, 0.5, 0.25, 16) == 1  # one question takes longer than its share: one a batch
    assert scoring_rows(None, 0.005, 0.25, 16) == scoring_rows(0.040, None, 0.25, 16) == 1  # before measuring
    assert scoring_rows(0.040, 0.5, 1.0, 16) == 16  # scoring may take all the time


def test_riders_a_step_carries_cost_the_scoring_share_of_a_step():
    # 90 ms plain steps, 3 ms more a rider, a quarter of the time for scoring: 90 * 0.25 / 0.75 = 30 ms,
    # ten riders (the step then takes 120 ms, of which riders 30 ms).
    assert scoring_rows(0.090, 0.003, 0.25, 16) == 10
    assert scoring_rows(0.090, 0.0001, 0.25, 16) == 16  # at most the configured batch
    assert scoring_rows(0.090, 0.5, 0.25, 16) == 1  # one rider costs more than its share: one
    assert scoring_rows(0.090, None, 0.25, 16) == 1  # before a rider's time is measured
    assert scoring_rows(0.090, 0.5, 1.0, 16) == 16  # scoring may take all the time


def test_scoring_interleaves_with_decoding(tiny_lm, profiles):
    """A long score request rides the decode steps of a stream submitted with it: the stream finishes long
    before the scoring does; the questions riding when it ends finish their prompts in one call on the
    positions they fed, the rest are read whole; every distribution is the answer reader's."""
    items = load_items(FIXTURES / "opinions_group_urban.jsonl")
    many = (items * (64 // len(items) + 1))[:64]
    want = answer_distributions(tiny_lm, many, orders=1)
    engine = GenerationEngine(tiny_lm, profiles=profiles, score_batch_size=4, score_share=0.25)
    try:
        stream = engine.submit(_prompt(engine, CHATS[0]), SamplingParams(max_tokens=40, temperature=0.0,
                                                                         ignore_eos=True))
        next(stream.chunks(60))  # decoding
        scored: dict = {}
        scorer = threading.Thread(target=lambda: scored.setdefault("out", engine.score(many, timeout=600)))
        scorer.start()
        stream.result(60)
        whole_reads = engine.stats.score_batches  # while the stream ran (one may have begun since it ended)
        scorer.join(600)
        assert whole_reads <= 1
        assert 0 < engine.stats.score_riders < 64 and engine.stats.score_batches > 0
        for g, w in zip(scored["out"].distributions, want, strict=True):
            assert g.tolist() == pytest.approx(w.tolist(), abs=1e-5)
    finally:
        engine.stop()


def test_riding_questions_are_steered_as_in_a_whole_read(tiny_lm, profiles):
    """Questions steered at prompt, last or all positions (DiffMean, ODESteer, a blend) ride a stream's decode
    steps, each row with its own prompt end; COLD-FD and linear COLD-Kernel (which need the whole prompt in one
    call) are read whole between steps. Every distribution equals the answer reader's."""
    ode = _fitted(tiny_lm, "odesteer", {"n_components": 512}, "last")
    ode.strength = float(ode.tensors["activation_norm"]) * 0.5
    rideable = [plan(profiles.vector(tiny_lm, LAYER, positions, _vector(tiny_lm, 20 + i)))
                for i, positions in enumerate(("prompt", "last", "all"))]
    rideable += [plan(profiles.add(ode)), plan((rideable[0].profiles[0].digest, 0.5), (profiles.add(ode), 0.5))]
    items = load_items(FIXTURES / "opinions_group_urban.jsonl")[:3]
    # A question lean reads the whole prompt's states, so its questions are read whole too.
    leaned = Profile.from_bytes(profiles.data[rideable[0].profiles[0].digest])
    seen = read_answers(tiny_lm, items, state_layers=[1]).states[1]
    leaned.question_lean = QuestionLean(1, seen.mean(0), seen.std(0) + 1e-6, _vector(tiny_lm, 30, 0.2).numpy(), 0.1)
    whole = [plan(profiles.add(_fitted(tiny_lm, "cold_fd", {"mode": "jvp", "rank": 4}, "prompt", strength=0.5))),
             plan(profiles.add(_fitted(tiny_lm, "cold_kernel", {"kernel": "linear"}, "last", strength=0.5))),
             plan(profiles.add(leaned))]
    plans = [p for p in [None, *rideable, *whole] for _ in items]
    asked = items * (len(plans) // len(items))
    # What a whole read gives, planned the engine's way (before the engine owns the model).
    steering = [InterventionCache(tiny_lm, profiles).resolve(p)[0] for p in plans]
    want = answer_distributions(tiny_lm, asked, steering, orders=1)
    n = len(items)
    for k in range(1, len(plans) // n):
        assert not all(np.allclose(w, u, atol=1e-4) for w, u in zip(want[k * n:(k + 1) * n], want[:n], strict=True)), \
            f"plan {k} should change the distributions"
    # All the time for scoring: eight riders a step whatever the timings, so they finish within the stream.
    engine = GenerationEngine(tiny_lm, profiles=profiles, score_batch_size=8, score_share=1.0)
    try:
        stream = engine.submit(_prompt(engine, CHATS[1]), SamplingParams(max_tokens=500, temperature=0.0,
                                                                         ignore_eos=True))
        next(stream.chunks(60))
        got = engine.score(asked, plans, timeout=300)
        assert engine.stats.active_rows == 1, "the stream should outlast the scoring"
        riders = engine.stats.score_riders
        stream.cancel()
        stream.result(60)
    finally:
        engine.stop()
    assert riders == n * (1 + len(rideable))
    assert engine.stats.score_batches > 0  # the COLD-FD and COLD-Kernel questions, whole
    for g, w in zip(got.distributions, want, strict=True):
        assert g.tolist() == pytest.approx(w.tolist(), abs=1e-5)
    # Each question's lean, read off its own (steered) prompt: the library reader's.
    states = read_answers(tiny_lm, items, steering[-1], [1], orders=1).states[1]
    want_leans = leaned.question_lean.leans(states).tolist()
    assert [lean[0] for lean in got.leans[-n:]] == pytest.approx(want_leans, abs=1e-4)
    assert all(value is None for lean in got.leans[:-n] for value in lean)


def test_request_threads_never_touch_torch(engine, tiny_lm, profiles, monkeypatch):
    """Many threads submitting steered requests at once: every model call, profile load and intervention
    build happens on the one engine thread."""
    seen: set[int] = set()
    built: list[int] = []
    diffmean = METHODS["diffmean"]

    def recorded(profile, lm):
        built.append(threading.get_ident())
        return diffmean.intervention(profile, lm)

    monkeypatch.setitem(METHODS, "diffmean", dataclasses.replace(diffmean, intervention=recorded))
    digests = [profiles.vector(tiny_lm, LAYER, "prompt", _vector(tiny_lm, seed)) for seed in (11, 12)]
    handle = tiny_lm.model.register_forward_pre_hook(lambda *a: seen.add(threading.get_ident()))
    try:
        results: list[list[int]] = []
        prompt = _prompt(engine, CHATS[2])

        def client(i: int) -> None:
            results.append(engine.generate(prompt, GREEDY, plan(digests[i % 2]), timeout=60).token_ids)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        handle.remove()
    assert len(results) == 6 and len({tuple(r) for r in results}) == 2
    assert seen == {engine._thread.ident}
    assert set(built) == set(profiles.threads) == {engine._thread.ident}
    assert len(built) == 2, "each profile's intervention is built once and cached"


def _fitted(lm, method: str, params: dict, positions: str, strength: float | None = None, n: int = 4) -> Profile:
    items = load_items(FIXTURES / "opinions_group_urban.jsonl")[:n]
    spec = get_method(method)
    profile = spec.fit(lm, items, [LAYER], spec.check_params(params), positions)[LAYER]
    if strength is not None:
        profile.strength = strength
    return profile


def test_every_method_and_blend_steers_its_own_row_in_a_shared_batch(tiny_lm, profiles):
    """DiffMean, COLD-Kernel (unit and linear), COLD-FD (an extra pass through blocks 0..L at prefill),
    ODESteer (a flow at the last position of every call) and blends, each on its own row of one batch,
    give each row's solo tokens."""
    ode = _fitted(tiny_lm, "odesteer", {"n_components": 512}, "last")
    ode.strength = float(ode.tensors["activation_norm"]) * 0.5
    ode2 = _fitted(tiny_lm, "odesteer", {"n_components": 512, "seed": 3}, "last", n=3)
    ode2.strength = ode.strength
    digests = {
        "diffmean": profiles.add(_fitted(tiny_lm, "diffmean", {}, "prompt", strength=4.0)),
        "kernel_unit": profiles.add(_fitted(tiny_lm, "cold_kernel", {"kernel": "unit"}, "all", strength=0.5)),
        "kernel_linear": profiles.add(_fitted(tiny_lm, "cold_kernel", {"kernel": "linear"}, "last", strength=0.5)),
        "cold_fd": profiles.add(_fitted(tiny_lm, "cold_fd", {"mode": "jvp", "rank": 4}, "prompt", strength=0.5)),
        "cold_fd_fd": profiles.add(_fitted(tiny_lm, "cold_fd", {"mode": "fd", "rank": 4}, "prompt", strength=0.5,
                                           n=3)),
        "odesteer": profiles.add(ode),
        "odesteer2": profiles.add(ode2),
    }
    steering = [plan(digests["diffmean"]), plan(digests["kernel_unit"]), plan(digests["kernel_linear"]),
                plan(digests["cold_fd"]), plan(digests["odesteer"]),
                plan((digests["cold_fd"], 0.7), (digests["cold_fd_fd"], -0.4)),  # one COLD-FD pass
                plan((digests["odesteer"], 0.5), (digests["odesteer2"], 0.5)),  # one barrier
                plan((digests["diffmean"], 0.5), (digests["cold_fd"], 1.0), (digests["odesteer"], 0.5)), None]
    engine = GenerationEngine(tiny_lm, profiles=profiles, max_batch_size=16, batch_wait_ms=100)
    try:
        chats = CHATS * 3
        prompts = [_prompt(engine, chats[i]) for i in range(len(steering))]
        unsteered = [_solo(engine, p) for p in prompts]
        alone = [_solo(engine, p, s) for p, s in zip(prompts, steering, strict=True)]
        changed = [a != u for a, u, s in zip(alone, unsteered, steering, strict=True) if s is not None]
        assert sum(changed) >= len(changed) - 1, f"the steering should change the tokens: {changed}"
        assert engine.stats.largest_batch == 1
        handles = [engine.submit(p, GREEDY, s) for p, s in zip(prompts, steering, strict=True)]
        assert [h.result(60).token_ids for h in handles] == alone
        assert engine.stats.largest_batch == len(steering)
    finally:
        engine.stop()


def test_the_queue_is_bounded_and_requests_expire(tiny_lm, profiles):
    engine = GenerationEngine(tiny_lm, profiles=profiles, max_batch_size=2, max_queue=2)
    gate = Gate(tiny_lm)
    try:
        prompt = _prompt(engine, CHATS[0])
        running = engine.submit(prompt, GREEDY)
        assert gate.entered.wait(30)  # the engine thread is inside its first model call
        waiting = [engine.submit(prompt, GREEDY), engine.submit(prompt, GREEDY, timeout=0.01)]
        with pytest.raises(EngineBusy) as info:
            engine.submit(prompt, GREEDY)
        assert info.value.retry_after >= 1 and engine.stats.queued == 2
        time.sleep(0.05)
        gate.open()
        assert running.result(60).completion_tokens == GREEDY.max_tokens
        assert waiting[0].result(60).completion_tokens == GREEDY.max_tokens
        with pytest.raises(DeadlineExceeded):
            waiting[1].result(60)
        assert engine.stats.expired == 1 and engine.stats.queued == 0
        assert engine.generate(prompt, GREEDY, timeout=60).completion_tokens == GREEDY.max_tokens
    finally:
        gate.open()
        engine.stop()


def test_a_stop_ends_every_admitted_request(tiny_lm, profiles):
    """Requests that arrive while the engine is busy are admitted in the same round as the stop: each
    ends with an error, none waits for a timeout."""
    engine = GenerationEngine(tiny_lm, profiles=profiles, max_batch_size=2)
    gate = Gate(tiny_lm)
    try:
        prompt = _prompt(engine, CHATS[0])
        shift = plan(profiles.vector(tiny_lm, LAYER, "prompt", _vector(tiny_lm, 1)))
        first = engine.submit(prompt, GREEDY)
        assert gate.entered.wait(30)
        late = [engine.submit(prompt, GREEDY, shift) for _ in range(4)]
        items = load_items(FIXTURES / "opinions_group_urban.jsonl")[:2]
        scored: dict = {}
        scorer = threading.Thread(target=lambda: scored.setdefault("error", _error_of(engine.score, items, shift)))
        scorer.start()
        while engine.stats.queued < 5:
            time.sleep(0.005)
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        while engine._inbox.qsize() < 6:  # the stop is queued behind them
            time.sleep(0.005)
        gate.open()
        stopper.join(60)
        scorer.join(60)
        for handle in [first, *late]:
            with pytest.raises(EngineStopped):
                handle.result(5)
        assert isinstance(scored["error"], EngineStopped)
        assert not engine.running and engine.stats.queued == 0
        with pytest.raises(EngineStopped):
            engine.submit(prompt, GREEDY)
    finally:
        gate.open()
        engine.stop()


def _error_of(fn, *args):
    try:
        fn(*args, timeout=60)
    except Exception as exc:
        return exc
    return None


def test_a_stop_that_cannot_join_reports_it(tiny_lm, profiles):
    engine = GenerationEngine(tiny_lm, profiles=profiles)
    gate = Gate(tiny_lm)
    try:
        handle = engine.submit(_prompt(engine, CHATS[0]), GREEDY)
        assert gate.entered.wait(30)
        assert engine.stop(timeout=0.1) is False and engine.running
        gate.open()
        with pytest.raises(EngineStopped):
            handle.result(30)
        engine._thread.join(30)
        assert not engine.running
    finally:
        gate.open()
        engine.stop()


@pytest.mark.model
def test_real_model_concurrent_profiles_match_each_alone(default_lm):
    """SmolLM2 with two different constant-vector profiles (word-embedding contrasts, city - farm and
    rural - urban, scaled to change the answer), batched together: each row generates its solo tokens."""
    embeddings = default_lm.model.get_input_embeddings().weight.detach()

    def contrast(a: str, b: str) -> torch.Tensor:
        ids = [default_lm.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in (a, b)]
        v = embeddings[ids[0]] - embeddings[ids[1]]
        return 16.0 * v / v.norm()

    layer = default_lm.num_layers // 2
    profiles = Profiles()
    steering = [plan(profiles.vector(default_lm, layer, "prompt", contrast("city", "farm"))),
                plan(profiles.vector(default_lm, layer, "prompt", contrast("rural", "urban")))]
    engine = GenerationEngine(default_lm, profiles=profiles, max_batch_size=4, batch_wait_ms=100)
    sampling = SamplingParams(max_tokens=8, temperature=0.0)
    try:
        prompt = _prompt(engine, "Is it better to live in a big city or in the countryside? Answer briefly.")
        alone = [_solo(engine, prompt, s, sampling) for s in steering]
        assert alone[0] != alone[1], "the two profiles should steer the answer differently"
        handles = [engine.submit(prompt, sampling, s) for s in steering]
        assert [h.result(120).token_ids for h in handles] == alone
        assert engine.stats.largest_batch == 2
    finally:
        engine.stop()
