"""The question lean: each question's own best lean, the probe that reads it off the prompt's states, the
reader that returns those states, the build's out-of-fold choice, and the profile file that carries it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steer_core import build_profile
from steer_core.build import MIN_LEAN_SAMPLE, choose_question_lean, lean_blocks, select_setting
from steer_core.calibration import Calibration, blend_per_question, sample_alignment
from steer_core.data import make_item
from steer_core.errors import ProfileError, SteerError
from steer_core.evaluation import read_orders
from steer_core.folds import fold_indices
from steer_core.option_orders import in_both_orders
from steer_core.profile import Profile
from steer_core.prompts import (
    PromptsAtBlock,
    answer_distributions,
    block_states,
    blocks_share_inputs,
    encode_items,
    read_answers,
)
from steer_core.question_lean import QuestionLean, fit_question_lean, item_leans
from steer_core.steering import ConstantShift

SCALE = ["Not at all", "Not too much", "Somewhat", "A great deal"]
AGENCIES = ["the police", "the army", "the fire service", "the coast guard", "the courts", "the border agency",
            "the FBI", "the national guard", "the secret service", "the sheriff", "the prison service",
            "the customs office", "the state troopers", "the park rangers", "the immigration office",
            "the marshals", "the election office", "the tax office", "the health inspectors", "the navy"]
FOODS = ["apples", "bread", "cheese", "rice", "beans", "pasta", "fish", "eggs", "yogurt", "oranges", "carrots",
         "potatoes", "soup", "salad", "noodles", "chicken", "nuts", "grapes", "tomatoes", "pancakes"]
TRUTH = Calibration(temperature=1.5)
UNIFORM = [0.25] * 4  # a placeholder target for the reads
TOPIC_LEAN = 2.5  # trust questions lean up the scale, food questions down


TRUST = ["to act in the public interest", "to tell the truth", "to protect your rights"]
LIKE = ["eating", "cooking", "buying"]


def _questions(kinds: int = 1) -> list:
    """Two kinds of question, alternating: how much one trusts an agency, how much one likes a food (20 of
    each per wording, `kinds` wordings)."""
    questions = []
    for trust, like in zip(TRUST[:kinds], LIKE[:kinds], strict=True):
        for agency, food in zip(AGENCIES, FOODS, strict=True):
            questions.append(make_item(f"How much do you trust {agency} {trust}?", SCALE, target=UNIFORM))
            questions.append(make_item(f"How much do you enjoy {like} {food}?", SCALE, target=UNIFORM))
    return questions


def _leaned_sample(lm, leans: np.ndarray) -> tuple[list, list[np.ndarray]]:
    """The questions with targets that are the model's own reading calibrated at TRUTH's temperature and
    leaned by `leans` (one per question: 40 per wording), and the readings."""
    questions = _questions(len(leans) // 40)
    readings = answer_distributions(lm, questions)
    items = [make_item(q.question, q.options,
                       target=Calibration(TRUTH.temperature, float(b)).apply(p, q.ordinal).tolist())
             for q, p, b in zip(questions, readings, leans, strict=True)]
    return items, readings


def _topic_leans(n: int) -> np.ndarray:
    return np.array([TOPIC_LEAN if i % 2 == 0 else -TOPIC_LEAN for i in range(n)])


def test_item_leans_recover_each_items_own_lean():
    rng = np.random.default_rng(0)
    items, dists, truth = [], [], rng.uniform(-3, 3, 12)
    for lean in truth:
        p = rng.dirichlet(np.ones(4))
        items.append(make_item("q?", SCALE, target=Calibration(0.7, float(lean)).apply(p, [1, 2, 3, 4]).tolist()))
        dists.append(p)
    assert item_leans(items, dists, 0.7) == pytest.approx(truth, abs=1e-3)
    # At another temperature the best lean is another one: the temperature is part of the fit.
    assert np.abs(item_leans(items, dists, 2.0) - truth).max() > 0.05
    # Options all at one ordinal position: no lean moves them, and the neutral one is recorded.
    flat = make_item("q?", ["a", "b"], target=[0.9, 0.1], ordinal=[1, 1])
    assert item_leans([flat], [np.array([0.2, 0.8])], 1.0).tolist() == [0.0]


def test_the_probe_reads_the_lean_from_the_block_that_carries_it():
    rng = np.random.default_rng(1)
    n, hidden = 120, 16
    w = rng.normal(size=hidden)
    states = {0: rng.normal(size=(n, hidden)), 5: rng.normal(size=(n, hidden)) * 3 + 1}
    leans = states[5] @ w * 0.2 + 0.4
    probe = fit_question_lean({k: v[:80] for k, v in states.items()}, leans[:80])
    assert probe.layer == 5
    predicted = probe.leans(states[5][80:])
    assert np.corrcoef(predicted, leans[80:])[0, 1] > 0.95
    assert probe.intercept == pytest.approx(leans[:80].mean())
    # Leans unrelated to the states: the penalty shrinks the probe to (about) the mean lean.
    noise = rng.normal(size=n)
    shrunk = fit_question_lean({0: states[0][:80]}, noise[:80])
    assert shrunk.leans(states[0][80:]).std() < 0.3 * noise.std()
    with pytest.raises(SteerError) as exc:
        fit_question_lean({0: states[0][:2]}, noise[:2])
    assert exc.value.field == "items"


def test_read_answers_returns_the_prompts_mean_states_from_the_same_call(tiny_lm):
    questions = _questions()[:5]
    read = read_answers(tiny_lm, questions, state_layers=[0, 2], orders=1)  # the options as given only
    assert [p.tolist() for p in read.distributions] == [p.tolist() for p in answer_distributions(tiny_lm, questions,
                                                                                                 orders=1)]
    for k, item in enumerate(questions):  # alone, without padding
        batch = encode_items(tiny_lm, [item])
        with torch.no_grad():
            hidden = tiny_lm.model(**batch, output_hidden_states=True).hidden_states
        for layer in (0, 2):
            assert read.states[layer][k] == pytest.approx(hidden[layer + 1][0].mean(0).numpy(), abs=1e-4)
    # A steering at block 2 moves the answers and the states after block 3, not the states it acts on.
    vector = torch.randn(tiny_lm.hidden_size) * 5
    steered = read_answers(tiny_lm, questions, [ConstantShift(2, "prompt", vector)], [2, 3], orders=1)
    assert steered.states[2] == pytest.approx(read.states[2], abs=1e-5)
    plain_3 = read_answers(tiny_lm, questions, state_layers=[3], orders=1).states[3]
    assert np.abs(steered.states[3] - plain_3).max() > 1e-2
    assert np.abs(np.stack(steered.distributions) - np.stack(read.distributions)).max() > 1e-4


def test_prompts_run_once_to_a_block_read_as_full_reads_under_each_steering(tiny_lm):
    """`PromptsAtBlock` shares the blocks below its block between reads: each read, unsteered or steered at
    that block or above, gives what `read_answers` gives, states below and above the block included."""
    questions = _questions()[:6]
    prompts = PromptsAtBlock(tiny_lm, questions, 2, state_layers=[0, 3], batch_size=4)
    vector = torch.randn(tiny_lm.hidden_size) * 5
    for steering in (None, [ConstantShift(2, "prompt", vector)], [ConstantShift(3, "all", vector)]):
        shared = prompts.read(steering)
        full = read_answers(tiny_lm, questions, steering, state_layers=[0, 3])
        np.testing.assert_allclose(np.concatenate(shared.distributions), np.concatenate(full.distributions),
                                   atol=2e-5)
        for order in (0, 1):
            np.testing.assert_allclose(np.concatenate(shared.by_order[order]), np.concatenate(full.by_order[order]),
                                       atol=2e-5)
        for layer in (0, 3):
            np.testing.assert_allclose(shared.states[layer], full.states[layer], atol=1e-4)
    assert np.abs(np.stack(prompts.read(steering).distributions) - np.stack(prompts.read().distributions)).max() > 1e-4
    with pytest.raises(ValueError, match="block 2 or above"):
        prompts.read([ConstantShift(1, "prompt", vector)])
    # The block's inputs kept from an earlier run stand for the blocks below (a llama's blocks are called alike).
    both = in_both_orders(questions)
    assert blocks_share_inputs(tiny_lm, [both[0], both[-1]], 2)
    kept = PromptsAtBlock(tiny_lm, questions, 2, state_layers=[3], batch_size=4, inputs=block_states(tiny_lm, both, 2))
    full = read_answers(tiny_lm, questions, [ConstantShift(2, "prompt", vector)], state_layers=[3])
    again = kept.read([ConstantShift(2, "prompt", vector)])
    np.testing.assert_allclose(np.concatenate(again.distributions), np.concatenate(full.distributions), atol=2e-5)
    np.testing.assert_allclose(again.states[3], full.states[3], atol=1e-4)
    with pytest.raises(ValueError, match="no states below block 2"):
        PromptsAtBlock(tiny_lm, questions, 2, state_layers=[0], inputs=block_states(tiny_lm, both, 2))


def test_the_build_ships_a_question_lean_only_where_the_questions_carry_it(default_lm):
    blocks = lean_blocks(default_lm)
    build, judge = np.arange(28), np.arange(28, 40)
    outcomes = {}
    for name, leans in (("by topic", _topic_leans(40)),
                        ("at random", np.random.default_rng(3).permutation(_topic_leans(40)))):
        items, readings = _leaned_sample(default_lm, leans)
        read = read_answers(default_lm, items, state_layers=blocks)
        sample = [items[i] for i in build]
        folds = fold_indices(len(sample), seed=0)
        chosen = select_setting(sample, [readings[i] for i in build], {}, folds)
        # The decision itself, on a sample smaller than a build would consider (min_items=0).
        lean, record, shipped, _ = choose_question_lean(sample, [readings[i] for i in build],
                                                     {k: x[build] for k, x in read.states.items()}, chosen, folds,
                                                     min_items=0)
        outcomes[name] = (lean, record)
        if lean is not None:
            judged = [items[i] for i in judge]
            plain = chosen.calibration.apply_all(judged, [readings[i] for i in judge])
            leaned = [c.apply(readings[i], items[i].ordinal) for c, i in
                      zip(lean.calibrations(chosen.calibration.temperature, read.states[lean.layer][judge]), judge,
                          strict=True)]
            outcomes[name] += (float((sample_alignment(judged, leaned) - sample_alignment(judged, plain)).mean()),)
            assert shipped["alignment"].mean() > chosen.shipped_items["alignment"].mean()
    lean, record, held_out_gain = outcomes["by topic"]
    assert lean is not None and record["shipped"] and record["layer"] == lean.layer in blocks
    assert record["gain_vs_calibration"]["alignment"] > 0
    assert held_out_gain > 0.02  # on questions the build never saw
    lean, record = outcomes["at random"][:2]
    assert lean is None and not record["shipped"] and record["layer"] is None


def test_a_built_question_lean_travels_in_the_profile_and_every_reader_applies_it(tiny_lm, tmp_path):
    items, _ = _leaned_sample(tiny_lm, _topic_leans(120))
    small = build_profile(tiny_lm, items[:MIN_LEAN_SAMPLE - 1], "diffmean", {"layer": 2})
    assert small.question_lean is None  # too few items to be considered, however clear the signal
    assert small.metrics["question_lean"]["note"].startswith(f"a question lean is considered from {MIN_LEAN_SAMPLE}")
    profile = build_profile(tiny_lm, items[:MIN_LEAN_SAMPLE], "diffmean", {"layer": 2})
    record = profile.metrics["question_lean"]
    assert record["shipped"] and profile.question_lean is not None, record
    assert profile.metrics["steered"]["alignment"] > profile.metrics["calibrated"]["alignment"]
    if profile.strength > 0:
        assert profile.question_lean.layer < profile.layer  # a block the shipped steering does not move

    loaded = Profile.load(profile.save(tmp_path / "p.safetensors"), tiny_lm)
    assert loaded.question_lean is not None and loaded.question_lean.layer == profile.question_lean.layer
    assert loaded.question_lean.weight == pytest.approx(profile.question_lean.weight, abs=1e-6)
    assert set(loaded.tensors) == set(profile.tensors)  # the lean's tensors are not the method's

    judged = items[MIN_LEAN_SAMPLE:]
    read = read_answers(tiny_lm, judged, state_layers=[loaded.question_lean.layer])
    own = read_orders(tiny_lm, judged, loaded)["original"]
    expected = [c.apply(p, it.ordinal) for c, p, it in
                zip(loaded.calibrations(judged, read.states), read.distributions, judged, strict=True)]
    assert np.stack(own) == pytest.approx(np.stack(expected), abs=1e-6)
    leans = loaded.question_lean.leans(read.states[loaded.question_lean.layer])
    assert leans.std() > 0.1  # the lean differs by question
    # In a blend the lean replaces its own profile's lean, question by question.
    other = Calibration(2.0, -1.0)
    blended = blend_per_question([(loaded.calibration, 1.0), (other, 1.0)], [[float(b), None] for b in leans])
    assert [c.lean for c in blended] == pytest.approx([(b - 1.0) / 2 for b in leans])
    with pytest.raises(ProfileError):
        loaded.calibrations(judged, {})  # its states were not read


def test_a_stored_question_lean_is_validated():
    lean = QuestionLean(1, np.zeros(4), np.ones(4), np.arange(4.0) / 10, 0.5)
    profile = Profile(method="diffmean", model_name="m", model_fingerprint="f", layer=1, positions="prompt",
                      strength=0.0, tensors={"vector": torch.zeros(4)}, question_lean=lean)
    data = profile.to_bytes()
    assert Profile.from_bytes(data).question_lean.leans(np.ones((1, 4))) == pytest.approx([1.1])
    with pytest.raises(SteerError) as exc:
        QuestionLean(1, np.zeros(3), np.ones(4), np.arange(4.0), 0.5)
    assert exc.value.field == "question_lean.center"
    with pytest.raises(SteerError) as exc:
        QuestionLean(1, np.zeros(4), np.zeros(4), np.arange(4.0), 0.5)
    assert exc.value.field == "question_lean.scale"
    broken = Profile(method="diffmean", model_name="m", model_fingerprint="f", layer=1, positions="prompt",
                     strength=0.0, tensors={"vector": torch.zeros(4), "question_lean.center": torch.zeros(4)})
    broken.metadata = lambda: {**Profile.metadata(broken), "question_lean": {"layer": 1, "intercept": 0.0}}
    with pytest.raises(ProfileError, match="question_lean"):
        Profile.from_bytes(broken.to_bytes())
