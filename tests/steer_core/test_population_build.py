"""A population learned on a (tiny) model and subjects fitted against it: a subject who answers the
population's own questions is fitted from the reads the population kept, to the same profile as one whose
answers are read again, without the unsteered read."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from support import FIXTURES

from steer_core.data import load_jsonl, reverse_options
from steer_core.population import Population, question_key
from steer_core.population_build import fit_subject_profile, learn_population, steering_block_inputs

SHARED = 12


@pytest.fixture(scope="module")
def towns(tiny_lm) -> tuple[Population, dict[str, list]]:
    rural = load_jsonl(FIXTURES / "opinions_group_rural.jsonl")[:SHARED]
    urban = load_jsonl(FIXTURES / "opinions_group_urban.jsonl")[:SHARED]
    population, _ = learn_population(tiny_lm, {"rural": rural, "urban": urban})
    assert population.vectors is not None
    # Steer whatever strength the tiny model's check chose, so the fit's steered read runs, and keep the
    # steering block's inputs for the questions as a steering population does.
    steering = population.with_steering(population.vectors, population.vector_layer, 2.0)
    kept = steering_block_inputs(tiny_lm, rural, steering.vector_layer)
    assert kept is not None  # a llama's blocks are all called alike
    return steering.with_known(steering.known, kept), {"rural": rural}


@contextmanager
def _block_calls(lm, blocks: tuple[int, ...]) -> Iterator[list[int]]:  # noqa: ANN001
    """The blocks of `blocks` as they are run inside the `with`, one entry per call."""
    calls: list[int] = []
    handles = [lm.blocks[b].register_forward_pre_hook(lambda module, args, b=b: calls.append(b)) for b in blocks]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def test_the_population_keeps_its_questions_reads(towns) -> None:
    population, groups = towns
    known = population.known
    assert known is not None and population.kept_inputs is not None
    assert known.keys == tuple(question_key(it) for it in groups["rural"]) == population.kept_inputs.keys
    again = Population.from_bytes(population.to_bytes())
    assert again.known is not None and again.known.keys == known.keys
    assert again.kept_inputs is not None and again.kept_inputs.lengths == population.kept_inputs.lengths
    np.testing.assert_array_equal(again.kept_inputs.hidden, population.kept_inputs.hidden)
    by_order, states = again.known.lookup(groups["rural"][:3])
    np.testing.assert_allclose(states, known.states[:3], atol=1e-5)
    assert [len(p) for p in by_order[0]] == [len(it.options) for it in groups["rural"][:3]]
    # Not known: a question it never read, or one of its questions with the options in another order.
    for unknown in (load_jsonl(FIXTURES / "opinions_group_rural.jsonl")[SHARED:SHARED + 1],
                    [reverse_options(groups["rural"][0])]):
        assert known.lookup(unknown) is None and population.kept_inputs.lookup(unknown) is None


def test_a_subject_on_known_questions_is_fitted_as_if_read_again(towns, tiny_lm) -> None:
    population, groups = towns
    person = groups["rural"][:8]
    lower, last = 1, tiny_lm.num_layers - 1  # a block below the steering one (2 of 4), and the last
    assert population.vector_layer > lower
    fits, calls = {}, {}
    for name, variant in (("kept inputs", population), ("known reads", population.with_known(population.known)),
                          ("read again", population.with_known(None))):
        with _block_calls(tiny_lm, (lower, last)) as seen:
            fits[name] = fit_subject_profile(tiny_lm, variant, person)
        calls[name] = (seen.count(lower), seen.count(last))
    # Read again: the lower blocks once for both reads, the upper twice. Known reads: the steered read only.
    # Kept inputs: the steered read from the steering block up.
    assert calls == {"kept inputs": (0, 1), "known reads": (1, 1), "read again": (1, 2)}
    want = fits["read again"]
    for name in ("kept inputs", "known reads"):
        got = fits[name]
        for key in ("weights", "steering_weights"):
            np.testing.assert_allclose(list(got.metrics["population"][key].values()),
                                       list(want.metrics["population"][key].values()), atol=1e-3)
        assert got.metrics["population"]["temperature"] == pytest.approx(want.metrics["population"]["temperature"],
                                                                         abs=1e-3)
        assert got.strength == want.strength
        np.testing.assert_allclose(got.tensors["vector"].numpy(), want.tensors["vector"].numpy(), atol=1e-3)
        assert got.metrics["generation"]["gain_vs_unsteered"]["mean"] == pytest.approx(
            want.metrics["generation"]["gain_vs_unsteered"]["mean"], abs=1e-4)


def test_a_subject_on_known_questions_of_a_population_that_does_not_steer_reads_nothing(towns, tiny_lm) -> None:
    population, groups = towns
    with _block_calls(tiny_lm, tuple(range(tiny_lm.num_layers))) as calls:
        profile = fit_subject_profile(tiny_lm, population.with_steering(population.vectors, population.vector_layer,
                                                                        0.0), groups["rural"][:8])
    assert calls == [] and profile.strength == 0
