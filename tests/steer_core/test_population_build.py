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
from steer_core.population_build import fit_subject_profile, learn_population

SHARED = 12


@pytest.fixture(scope="module")
def towns(tiny_lm) -> tuple[Population, dict[str, list]]:
    rural = load_jsonl(FIXTURES / "opinions_group_rural.jsonl")[:SHARED]
    urban = load_jsonl(FIXTURES / "opinions_group_urban.jsonl")[:SHARED]
    population, _ = learn_population(tiny_lm, {"rural": rural, "urban": urban})
    assert population.vectors is not None
    # Steer whatever strength the tiny model's check chose, so the fit's steered read runs.
    return population.with_steering(population.vectors, population.vector_layer, 2.0), {"rural": rural}


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
    assert known is not None
    assert known.keys == tuple(question_key(it) for it in groups["rural"])
    again = Population.from_bytes(population.to_bytes())
    assert again.known is not None and again.known.keys == known.keys
    by_order, states = again.known.lookup(groups["rural"][:3])
    np.testing.assert_allclose(states, known.states[:3], atol=1e-5)
    assert [len(p) for p in by_order[0]] == [len(it.options) for it in groups["rural"][:3]]
    # Not known: a question it never read, or one of its questions with the options in another order.
    assert known.lookup(load_jsonl(FIXTURES / "opinions_group_rural.jsonl")[SHARED:SHARED + 1]) is None
    assert known.lookup([reverse_options(groups["rural"][0])]) is None


def test_a_subject_on_known_questions_is_fitted_as_if_read_again(towns, tiny_lm) -> None:
    population, groups = towns
    person = groups["rural"][:8]
    with _block_calls(tiny_lm, (tiny_lm.num_layers - 1,)) as calls:
        from_known = fit_subject_profile(tiny_lm, population, person)
        known_calls = len(calls)
        read_again = fit_subject_profile(tiny_lm, population.with_known(None), person)
    assert (known_calls, len(calls) - known_calls) == (1, 2)  # the steered read only; both reads
    fitted = [p.metrics["population"] for p in (from_known, read_again)]
    for key in ("weights", "steering_weights"):
        np.testing.assert_allclose(list(fitted[0][key].values()), list(fitted[1][key].values()), atol=1e-3)
    assert fitted[0]["temperature"] == pytest.approx(fitted[1]["temperature"], abs=1e-3)
    assert from_known.strength == read_again.strength
    np.testing.assert_allclose(from_known.tensors["vector"].numpy(), read_again.tensors["vector"].numpy(), atol=1e-3)


def test_a_subject_on_known_questions_of_a_population_that_does_not_steer_reads_nothing(towns, tiny_lm) -> None:
    population, groups = towns
    with _block_calls(tiny_lm, tuple(range(tiny_lm.num_layers))) as calls:
        profile = fit_subject_profile(tiny_lm, population.with_steering(population.vectors, population.vector_layer,
                                                                        0.0), groups["rural"][:8])
    assert calls == [] and profile.strength == 0
