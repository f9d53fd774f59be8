"""The population (`steer_core.population`) on synthetic readings and states: groups whose leans are a known
linear function of the question's state, subjects that are one group or a mixture of two, the question
chooser, the blended question lean, the stored parts, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steer_core.calibration import Calibration, sample_alignment
from steer_core.data import make_item
from steer_core.errors import SteerError
from steer_core.population import (
    KeptInputs,
    KnownQuestions,
    Population,
    build_population,
    fit_subject,
    group_leans,
    group_vectors,
    informative_questions,
    question_key,
    subject_lean,
)
from steer_core.profile import Profile

HIDDEN = 6
LAYER = 4
OPTIONS = ["Never", "Rarely", "Sometimes", "Often", "Always"]
GROUP_TEMPERATURES = {"left": 1.6, "middle": 1.2, "right": 2.0}


def _questions(n: int, seed: int) -> tuple[list, list[np.ndarray], dict[int, np.ndarray]]:
    """`n` five-option questions with random unsteered readings and random states at block LAYER (and a
    useless block 1 of pure noise: the build must pick LAYER)."""
    rng = np.random.default_rng(seed)
    questions = [make_item(f"Question {seed}-{i}?", OPTIONS, target=[0.2] * 5) for i in range(n)]
    dists = [rng.dirichlet(np.full(5, 3.0)) for _ in range(n)]
    states = {LAYER: rng.normal(size=(n, HIDDEN)) * 2.0 + 1.0, 1: rng.normal(size=(n, HIDDEN))}
    return questions, dists, states


# Each group's true lean is `states @ TRUE_WEIGHT[g] / 2 + TRUE_INTERCEPT[g]`: groups disagree on every question.
TRUE_WEIGHT = {"left": np.array([1.0, -0.5, 0.0, 0.3, 0.0, 0.0]),
               "middle": np.array([0.0, 0.2, 0.0, 0.0, 0.0, 0.1]),
               "right": np.array([-1.0, 0.5, 0.4, 0.0, 0.0, 0.0])}
TRUE_INTERCEPT = {"left": -0.4, "middle": 0.0, "right": 0.6}


def _true_leans(states: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    return {g: states[LAYER] @ TRUE_WEIGHT[g] / 2 + TRUE_INTERCEPT[g] for g in TRUE_WEIGHT}


def _answered(questions: list, dists: list[np.ndarray], temperature: float, leans: np.ndarray) -> list:
    """The questions with targets the readings calibrated at `temperature` and each question's lean."""
    return [make_item(q.question, q.options, target=Calibration(temperature, float(b)).apply(p, q.ordinal).tolist())
            for q, p, b in zip(questions, dists, leans, strict=True)]


@pytest.fixture(scope="module")
def population() -> Population:
    questions, dists, states = _questions(300, seed=0)
    leans = _true_leans(states)
    groups = {g: _answered(questions, dists, GROUP_TEMPERATURES[g], leans[g]) for g in TRUE_WEIGHT}
    return build_population(groups, dists, states)


def test_build_recovers_each_groups_temperature_and_leans(population: Population) -> None:
    assert population.groups == ("left", "middle", "right")
    assert population.layer == LAYER  # the block that carries the leans, not the noise block
    # Fitted without a lean, a group's temperature also soaks up how its leans vary: a little above the truth.
    truth_t = np.array(list(GROUP_TEMPERATURES.values()))
    assert (population.temperatures >= truth_t * 0.98).all() and (population.temperatures <= truth_t * 1.15).all()
    questions, dists, states = _questions(100, seed=1)  # new questions
    predicted = group_leans(population, states)
    truth = np.column_stack(list(_true_leans(states).values()))
    assert predicted.shape == (100, 3)
    for g in range(3):
        assert np.corrcoef(predicted[:, g], truth[:, g])[0, 1] > 0.99
    assert np.abs(predicted - truth).max() < 0.3


def test_folds_choose_the_block_by_held_out_error() -> None:
    questions, dists, states = _questions(120, seed=6)
    leans = _true_leans(states)
    groups = {g: _answered(questions, dists, GROUP_TEMPERATURES[g], leans[g]) for g in TRUE_WEIGHT}
    folds = [list(range(k, 120, 4)) for k in range(4)]
    by_folds = build_population(groups, dists, states, folds)
    assert by_folds.layer == LAYER
    by_loo = build_population(groups, dists, states)
    np.testing.assert_allclose(group_leans(by_folds, states), group_leans(by_loo, states), atol=0.2)
    with pytest.raises(SteerError) as e:
        build_population(groups, dists, states, [list(range(60))])
    assert e.value.field == "folds"


def test_a_subject_that_is_one_group_recovers_it(population: Population) -> None:
    questions, dists, states = _questions(20, seed=2)
    leans = group_leans(population, states)
    items = _answered(questions, dists, float(population.temperatures[2]), leans[:, 2])  # exactly "right"
    fit = fit_subject(population, items, dists, states)
    assert int(np.argmax(fit.weights)) == 2
    assert fit.weights[2] > 0.9
    assert fit.temperature == pytest.approx(population.temperatures[2], rel=0.02)
    assert fit.weights.sum() == pytest.approx(1.0) and (fit.weights >= 0).all()
    unpenalized = fit_subject(population, items, dists, states, penalty=0.0)
    assert unpenalized.weights[2] > 0.99
    assert unpenalized.loss <= fit.loss + 1e-9  # the penalty costs fit


def test_a_mixture_of_two_groups_recovers_its_weights(population: Population) -> None:
    questions, dists, states = _questions(20, seed=3)
    leans = group_leans(population, states)
    mixed = 0.3 * leans[:, 0] + 0.7 * leans[:, 2]
    items = _answered(questions, dists, 1.5, mixed)
    exact = fit_subject(population, items, dists, states, penalty=0.0)
    np.testing.assert_allclose(exact.weights, [0.3, 0.0, 0.7], atol=0.02)
    assert exact.temperature == pytest.approx(1.5, rel=0.02)
    # The default penalty pulls toward uniform but keeps the mixture's shape.
    fit = fit_subject(population, items, dists, states)
    assert fit.weights[2] > fit.weights[0] > fit.weights[1]
    assert abs(fit.weights[0] - 0.3) < 0.1 and abs(fit.weights[2] - 0.7) < 0.1


def test_the_subjects_question_lean_is_the_blend_of_the_groups(population: Population) -> None:
    questions, dists, states = _questions(20, seed=4)
    leans = group_leans(population, states)
    items = _answered(questions, dists, 1.3, 0.5 * leans[:, 0] + 0.5 * leans[:, 1])
    fit = fit_subject(population, items, dists, states)
    probe = fit.question_lean
    assert probe.layer == population.layer
    np.testing.assert_allclose(probe.leans(states[LAYER]), np.clip(leans @ fit.weights, -5, 5), atol=1e-9)
    # What a profile serves: its temperature with the lean read off each question.
    profile = Profile(method="population", model_name="toy", model_fingerprint="toy", layer=LAYER,
                      positions="all", strength=0.0, tensors={}, calibration=fit.calibration, question_lean=probe)
    served = [c.apply(p, q.ordinal) for c, p, q in zip(profile.calibrations(items, states), dists, questions,
                                                        strict=True)]
    for q, p, b in zip(questions, served, leans @ fit.weights, strict=True):
        assert p == pytest.approx(Calibration(fit.temperature, float(b)).apply(dists[questions.index(q)],
                                                                               q.ordinal))
    # A good fit: it aligns with the subject better than the unsteered readings do.
    assert sample_alignment(items, served).mean() > sample_alignment(items, dists).mean()
    round_trip = Profile.from_bytes(profile.to_bytes())
    assert round_trip.question_lean is not None
    np.testing.assert_allclose(round_trip.question_lean.leans(states[LAYER]), probe.leans(states[LAYER]), atol=1e-4)


def test_the_chooser_picks_the_questions_where_groups_disagree() -> None:
    # Two groups, a one-unit state: they agree when the state is 0 and disagree in proportion to it.
    toy = Population(("a", "b"), 0, np.zeros(1), np.ones(1), np.array([[1.0, -1.0]]), np.zeros(2),
                     np.ones(2))
    states = {0: np.array([[0.1], [-2.0], [0.0], [0.7], [3.0]])}
    assert informative_questions(toy, states, 1) == [4]
    assert informative_questions(toy, states, 3) == [4, 1, 3]
    assert informative_questions(toy, states, 10) == [4, 1, 3, 0, 2]
    assert informative_questions(toy, states, 0) == []


def test_stored_parts_round_trip(population: Population) -> None:
    tensors = {k: v.clone() for k, v in population.tensors().items()}
    again = Population.from_parts(population.to_json(), tensors)
    assert again.groups == population.groups and again.layer == population.layer
    np.testing.assert_allclose(again.weight, population.weight, rtol=1e-6, atol=1e-6)
    with pytest.raises(SteerError) as err:
        Population.from_parts({"groups": ["a"], "layer": 0, "vector_layer": 0, "strength": 0.0},
                              {k: torch.zeros(1) for k in population.tensors()})
    assert err.value.field is not None and err.value.field.startswith("population.")


def test_steering_basis_round_trips_and_blends(population: Population) -> None:
    vectors = np.arange(len(population.groups) * HIDDEN, dtype=float).reshape(len(population.groups), HIDDEN)
    steered = population.with_steering(vectors, vector_layer=3, strength=2.0)
    again = Population.from_bytes(steered.to_bytes())
    assert again.vector_layer == 3 and again.strength == 2.0
    assert again.vectors is not None
    np.testing.assert_allclose(again.vectors, vectors)
    np.testing.assert_allclose(again.subject_vector(np.array([0.5, 0.5, 0.0])), 0.5 * (vectors[0] + vectors[1]))
    assert not population.subject_vector(np.full(3, 1 / 3)).any()  # no basis: no steering
    with pytest.raises(SteerError) as err:
        population.with_steering(None, 0, 1.0)
    assert err.value.field == "population.strength"
    with pytest.raises(SteerError) as err:
        population.with_steering(vectors[:2], 0, 1.0)
    assert err.value.field == "population.vectors"


def test_a_file_that_is_not_a_population_is_refused(population: Population) -> None:
    for data in (b"", b"not safetensors", Profile(method="diffmean", model_name="m", model_fingerprint="f", layer=0,
                                                  positions="prompt", strength=1.0,
                                                  tensors={"vector": torch.zeros(HIDDEN)}).to_bytes()):
        with pytest.raises(SteerError) as err:
            Population.from_bytes(data, source="upload")
        assert err.value.field == "upload"


def test_group_vectors_point_from_the_others_to_each_group() -> None:
    # Two questions, two options: option k's activation is the unit vector e_k. Group "a" always answers the
    # first option, "b" the second, "c" splits: a's direction is e0 - e1, b's the opposite, c's nothing.
    z = np.array([[[1.0, 0.0], [0.0, 1.0]]] * 2)
    valid = np.ones((2, 2), dtype=bool)
    targets = np.array([[[1.0, 0.0]] * 2, [[0.0, 1.0]] * 2, [[0.5, 0.5]] * 2])
    vectors = group_vectors(z, valid, targets)
    direction = np.array([1.0, -1.0])
    assert vectors[0] @ direction > 0 and vectors[1] @ direction < 0
    np.testing.assert_allclose(vectors[0], -vectors[1])
    np.testing.assert_allclose(vectors[2], 0.0, atol=1e-12)
    # a against the mean of b and c (0.25, 0.75): weights (0.75, -0.75), mean total variation 0.75.
    np.testing.assert_allclose(vectors[0], direction)


def _field(excinfo: pytest.ExceptionInfo[SteerError]) -> str | None:
    return excinfo.value.field


def test_bad_input_names_the_field(population: Population) -> None:
    questions, dists, states = _questions(10, seed=5)
    items = _answered(questions, dists, 1.0, np.zeros(10))
    with pytest.raises(SteerError) as e:
        fit_subject(population, [], [], {LAYER: np.zeros((0, HIDDEN))})
    assert _field(e) == "items"
    with pytest.raises(SteerError) as e:
        fit_subject(population, items, dists[:9], states)
    assert _field(e) == "dists"
    with pytest.raises(SteerError) as e:
        fit_subject(population, items, dists, {LAYER: states[LAYER][:9]})
    assert _field(e) == "states"
    with pytest.raises(SteerError) as e:
        fit_subject(population, items, dists, {1: states[1]})  # not the population's block
    assert _field(e) == "states"
    with pytest.raises(SteerError) as e:
        fit_subject(population, items, dists, {LAYER: np.zeros((10, HIDDEN + 1))})
    assert _field(e) == "states"
    with pytest.raises(SteerError) as e:
        build_population({"only": items}, dists, states)
    assert _field(e) == "groups"
    with pytest.raises(SteerError) as e:
        build_population({"a": items, "b": items[:9]}, dists, states)
    assert _field(e) == "groups"
    with pytest.raises(SteerError) as e:
        build_population({"a": items, "b": items}, dists, {LAYER: states[LAYER][:9]})
    assert _field(e) == "states"
    with pytest.raises(SteerError) as e:
        informative_questions(population, states, -1)
    assert _field(e) == "k"
    with pytest.raises(SteerError) as e:
        subject_lean(population, np.ones(2))
    assert _field(e) == "weights"
    with pytest.raises(SteerError) as e:
        Population(("a", "b"), 0, np.zeros(2), np.ones(2), np.zeros((2, 3)), np.zeros(2), np.ones(2))
    assert _field(e) == "population.weight"


def test_known_questions_are_checked_and_looked_up_by_question_and_option_order(population: Population) -> None:
    questions, dists, states = _questions(3, seed=7)
    answers = np.zeros((2, 3, 5))
    answers[0], answers[1] = np.stack(dists), np.stack(dists)[:, ::-1]
    known = KnownQuestions(tuple(question_key(q) for q in questions), (5, 5, 5), answers, states[LAYER])
    by_order, found = known.lookup([questions[2], questions[0]])
    np.testing.assert_allclose(by_order[0][0], dists[2])
    np.testing.assert_allclose(by_order[1][1], dists[0][::-1])
    np.testing.assert_allclose(found, states[LAYER][[2, 0]])
    assert known.lookup([questions[0], make_item("Another?", OPTIONS, target=[0.2] * 5)]) is None
    again = Population.from_bytes(population.with_known(known).to_bytes())
    assert again.known is not None and again.known.keys == known.keys and again.known.options == known.options
    bad = {"keys": (known.keys[0],) * 3, "options": (5, 5, 1), "answers": answers[:1], "states": states[LAYER][:2]}
    for name, value in bad.items():
        parts = {"keys": known.keys, "options": known.options, "answers": answers, "states": states[LAYER]}
        with pytest.raises(SteerError) as e:
            KnownQuestions(**{**parts, name: value})
        assert _field(e) == f"population.known_questions.{name}"
    with pytest.raises(SteerError) as e:
        population.with_known(KnownQuestions(known.keys, known.options, answers, states[LAYER][:, :2]))
    assert _field(e) == "population.known_questions.states"
    # The steering block's inputs kept for the first questions: both orders of each, in that order.
    lengths = (2, 3, 1, 4)
    hidden = np.arange(sum(lengths) * HIDDEN, dtype=float).reshape(-1, HIDDEN)
    kept = KeptInputs(known.keys[:2], lengths, hidden)
    rows = kept.lookup([questions[1]])
    assert rows is not None and [r.tolist() for r in rows] == [hidden[2:5].tolist(), hidden[6:10].tolist()]
    assert kept.lookup([questions[2]]) is None
    again = Population.from_bytes(population.with_known(known, kept).to_bytes())
    assert again.kept_inputs is not None and again.kept_inputs.lengths == lengths
    for bad, field in (({"lengths": (2, 3, 1)}, "lengths"), ({"hidden": hidden[1:]}, "hidden"),
                       ({"keys": known.keys[:1] * 2}, "keys")):
        with pytest.raises(SteerError) as e:
            KeptInputs(**{"keys": known.keys[:2], "lengths": lengths, "hidden": hidden, **bad})
        assert _field(e) == f"population.kept_inputs.{field}"
