"""The generation engine on tiny random models: batching never changes a row's tokens, each row keeps its
own steering (constant vectors, COLD-FD, ODESteer), failures and cancellations stay in their row."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch
from support import FIXTURES, make_tiny

from service.engine import GenerationEngine, GenerationFailed, SamplingParams
from steer_core.data import load_items
from steer_core.errors import SteerError
from steer_core.methods import get_method
from steer_core.prompts import answer_distributions
from steer_core.steering import ConstantShift, compose

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
CHATS = ["Hello there", "Tell me a long story about a dog who lived near the sea and liked to swim", "Why?"]
LAYER = 2


def _vector(lm, seed: int, scale: float = 4.0) -> torch.Tensor:
    return scale * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(seed))


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
def engine(tiny_lm):
    before = _hooks(tiny_lm)
    eng = GenerationEngine(tiny_lm, max_batch_size=8, batch_wait_ms=30, max_new_tokens=64)
    yield eng
    eng.stop()
    assert _hooks(tiny_lm) == before, "the engine left hooks behind"


def _solo(engine, prompt, steering=None, sampling=GREEDY):
    return engine.generate(prompt, sampling, steering, timeout=60).token_ids


def test_concurrent_rows_with_different_steering_get_the_tokens_they_get_alone(engine, tiny_lm):
    prompts = [_prompt(engine, c) for c in CHATS]
    steering = [[ConstantShift(LAYER, "prompt", _vector(tiny_lm, 1))],
                None,
                [ConstantShift(1, "all", _vector(tiny_lm, 2)), ConstantShift(3, "last", _vector(tiny_lm, 3))]]
    alone = [_solo(engine, p, s) for p, s in zip(prompts, steering, strict=True)]
    assert alone[0] != _solo(engine, prompts[0]), "the steering should change the greedy tokens"
    handles = [engine.submit(p, GREEDY, s) for p, s in zip(prompts, steering, strict=True)]
    together = [h.result(60).token_ids for h in handles]
    assert together == alone
    assert engine.stats.largest_batch == 3


def test_a_request_joining_a_running_batch_gets_its_own_tokens(engine, tiny_lm):
    long_run = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    p0, p1 = _prompt(engine, CHATS[0]), _prompt(engine, CHATS[1])
    s1 = [ConstantShift(LAYER, "all", _vector(tiny_lm, 4))]
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
    engine = GenerationEngine(lm, max_batch_size=4, batch_wait_ms=30)
    try:
        prompts = [_prompt(engine, c) for c in CHATS]
        steering = [None, [ConstantShift(1, "prompt", _vector(lm, 5))], None]
        alone = [_solo(engine, p, s) for p, s in zip(prompts, steering, strict=True)]
        handles = [engine.submit(p, GREEDY, s) for p, s in zip(prompts, steering, strict=True)]
        assert [h.result(60).token_ids for h in handles] == alone
    finally:
        engine.stop()


def test_zero_weight_blend_generates_the_unsteered_tokens(engine, tiny_lm):
    prompt = _prompt(engine, CHATS[1])
    blend = compose([(ConstantShift(LAYER, "prompt", _vector(tiny_lm, 6)), 0.0),
                     (ConstantShift(1, "all", _vector(tiny_lm, 7)), 0.0)])
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


@dataclass(frozen=True, eq=False)
class Exploding:
    """An intervention that fails, as a corrupt or buggy profile would."""

    layer: int
    positions: str = "prompt"

    def displacement(self, hidden, ctx, rows):
        raise RuntimeError("boom")

    @classmethod
    def blend(cls, weighted):
        return weighted[0][0]


def test_a_failing_row_fails_only_its_own_request(engine, tiny_lm):
    good = _prompt(engine, CHATS[1])
    shift = [ConstantShift(LAYER, "prompt", _vector(tiny_lm, 8))]
    alone = _solo(engine, good, shift)
    bad = engine.submit(_prompt(engine, CHATS[0]), GREEDY, [Exploding(LAYER)])
    infinite = engine.submit(_prompt(engine, CHATS[2]), GREEDY,
                             [ConstantShift(LAYER, "prompt", torch.full((tiny_lm.hidden_size,), float("inf")))])
    fine = engine.submit(good, GREEDY, shift)
    with pytest.raises(GenerationFailed, match="boom"):
        bad.result(60)
    with pytest.raises(GenerationFailed, match="non-finite"):
        infinite.result(60)
    assert fine.result(60).token_ids == alone
    assert engine.stats.failed == 2
    assert engine.generate(good, GREEDY, shift, timeout=60).token_ids == alone  # the engine goes on


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


def test_bad_requests_name_the_field(engine):
    prompt = _prompt(engine, CHATS[0])
    with pytest.raises(SteerError) as info:
        engine.submit(prompt, SamplingParams(max_tokens=65))
    assert info.value.field == "max_tokens"
    with pytest.raises(SteerError) as info:
        engine.submit(prompt * 400, GREEDY)
    assert info.value.field == "prompt"
    with pytest.raises(SteerError) as info:
        engine.submit(prompt, GREEDY, [ConstantShift(99, "prompt", torch.zeros(64))])
    assert info.value.field == "layer"
    with pytest.raises(SteerError) as info:
        engine.submit(prompt, SamplingParams(max_tokens=8, temperature=float("nan")))
    assert info.value.field == "temperature"


def test_scores_on_the_engine_thread_equal_the_answer_reader(engine, tiny_lm):
    items = load_items(FIXTURES / "opinions_group_urban.jsonl")[:3]
    shift = [ConstantShift(LAYER, "prompt", _vector(tiny_lm, 9))]
    want = answer_distributions(tiny_lm, items, [shift, None, shift])  # before the engine owns the model
    # generation keeps running while scores are read between its steps
    running = engine.submit(_prompt(engine, CHATS[0]), SamplingParams(max_tokens=40, temperature=0.0,
                                                                      ignore_eos=True), shift)
    got = engine.score(items, [shift, None, shift], timeout=60)
    running.result(60)
    for g, w in zip(got, want, strict=True):
        assert g.tolist() == pytest.approx(w.tolist(), abs=1e-6)


def test_request_threads_never_run_the_model(engine, tiny_lm):
    """Many threads submitting at once: all work happens on the one engine thread."""
    seen: set[int] = set()
    handle = tiny_lm.model.register_forward_pre_hook(lambda *a: seen.add(threading.get_ident()))
    try:
        results: list[list[int]] = []
        prompt = _prompt(engine, CHATS[2])

        def client() -> None:
            results.append(engine.generate(prompt, GREEDY, timeout=60).token_ids)

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        handle.remove()
    assert len(results) == 6 and all(r == results[0] for r in results)
    assert seen == {engine._thread.ident}


def _tiny_profiles(lm, method: str, params: dict, positions: str):
    items = load_items(FIXTURES / "opinions_group_urban.jsonl")[:4]
    spec = get_method(method)
    profile = spec.fit(lm, items, [LAYER], spec.check_params(params), positions)[LAYER]
    return profile


def test_every_method_steers_its_own_row_in_a_shared_batch(tiny_lm):
    """COLD-FD (an extra pass through blocks 0..L at prefill), ODESteer (a flow at the last position of
    every call) and a constant vector, each on its own row of one batch, give each row's solo tokens."""
    from steer_core.methods import intervention

    cold = _tiny_profiles(tiny_lm, "cold_fd", {"mode": "jvp", "rank": 4}, "prompt")
    cold.strength = 0.5
    ode = _tiny_profiles(tiny_lm, "odesteer", {"n_components": 512}, "last")
    ode.strength = float(ode.tensors["activation_norm"]) * 0.5
    steering = [compose([(intervention(cold, tiny_lm), 1.0)]), compose([(intervention(ode, tiny_lm), 1.0)]),
                [ConstantShift(LAYER, "all", _vector(tiny_lm, 10))], None]
    engine = GenerationEngine(tiny_lm, max_batch_size=8, batch_wait_ms=50)
    try:
        prompts = [_prompt(engine, c) for c in (CHATS[0], CHATS[1], CHATS[2], CHATS[1])]
        unsteered = [_solo(engine, p) for p in prompts]
        alone = [_solo(engine, p, s) for p, s in zip(prompts, steering, strict=True)]
        assert alone[0] != unsteered[0] and alone[1] != unsteered[1], "each method should change its tokens"
        handles = [engine.submit(p, GREEDY, s) for p, s in zip(prompts, steering, strict=True)]
        assert [h.result(60).token_ids for h in handles] == alone
    finally:
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
    steering = [[ConstantShift(layer, "prompt", contrast("city", "farm"))],
                [ConstantShift(layer, "prompt", contrast("rural", "urban"))]]
    engine = GenerationEngine(default_lm, max_batch_size=4, batch_wait_ms=100)
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
