"""Populations on a model: learn one from a survey's groups (`learn_population`), fit a subject's ordinary
profile against it from a few answers (`fit_subject_profile`), and choose which questions to ask next
(`next_questions`). The math is `steer_core.population`; this module reads the model.

A population carries two parts a subject blends with the same weights:
- the question lean (a ridge probe from each prompt's state to every group's lean), for answer distributions;
- the steering basis (each group's DiffMean direction against the other groups, from the answers of all of
  them to the same questions), for generation: what a subject's profile carries to chat.
It also keeps its questions' unsteered reads (`KnownQuestions`), so that a subject who answers them (the
service suggests a new subject the population's own questions, most informative first) is fitted without
reading them unsteered again, and, when it steers, its steering block's inputs for the questions it suggests
first (`KeptInputs`), so that such a subject's steered read runs only the blocks above that one.

The basis's strength is chosen once per population on questions held out of its vectors, by what chat sees:
each option order read on its own, steered by a group's own vector and uncalibrated, against the unsteered
model. When no strength moves those answers toward the groups by more than one standard error the population
steers at strength 0 and subjects carry only their calibration and question lean.

A subject's fit runs no backward pass: one debiased read of its answered questions (with the prompts' states)
gives its weights over the groups and its temperature (`fit_subject`); when the population steers, one more
read under the blended vector (the blocks below the vector's shared with the first read, `PromptsAtBlock`;
for the population's own questions the first read is the population's) decides whether the steering ships
(the build's rule: not when it moves the subject's own answers away from it, each order read alone) and, when
it does, refits the weights and temperature on what `/v1/score` will read, so the calibration and lean are
fitted on the steered answers they are applied to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from steer_core.activations import answer_activations
from steer_core.build import lean_blocks
from steer_core.calibration import sample_alignment
from steer_core.data import OpinionItem, sample_hash
from steer_core.errors import SteerError
from steer_core.evaluation import paired_difference
from steer_core.methods import default_layers
from steer_core.metrics import item_metrics, mean_metrics
from steer_core.models import LanguageModel
from steer_core.option_orders import average_orders, in_both_orders, split_orders
from steer_core.population import (
    SUBJECT_PENALTY,
    KeptInputs,
    KnownQuestions,
    Population,
    build_population,
    fit_subject,
    group_vectors,
    question_key,
)
from steer_core.population import informative_questions as rank_by_disagreement
from steer_core.profile import Profile
from steer_core.prompts import (
    AnswerRead,
    PromptsAtBlock,
    answer_distributions_under,
    block_states,
    blocks_share_inputs,
    read_answers,
)
from steer_core.steering import ConstantShift, Intervention
from steer_core.verdict import generation_gain

Progress = Callable[[int, int, str], None]

VECTOR_STRENGTHS = (0.5, 1.0, 2.0, 4.0, 8.0)
# Caps that keep a population of ~35 groups x 1,000 questions within minutes on a CPU: the basis's vectors
# average over at most this many questions (each read once per option and order), and its strength is
# checked on at most this many held-out questions for at most this many groups.
MAX_VECTOR_QUESTIONS = 300
MAX_CHECK_QUESTIONS = 60
MAX_CHECK_GROUPS = 4
POSITIONS = "prompt"  # where a subject's vector steers: DiffMean's default
# A steering population keeps its steering block's inputs for this many of its questions, those it asks a new
# subject first (both orders, about 330 kB a question on the default model): a subject who answered only those
# is read under its vector from that block up.
KEPT_QUESTIONS = 40


def learn_population(lm: LanguageModel, groups: Mapping[str, Sequence[OpinionItem]],
                     folds: Sequence[Sequence[int]] | None = None, progress: Progress | None = None,
                     seed: int = 0) -> tuple[Population, dict[str, Any]]:
    """Learn a population from groups that answered the same questions (item i of every group is the same
    question; only the targets differ), and a report of what was chosen (with `question_order`: the question
    indices, most informative for a new subject first). `folds` (question indices, e.g. one
    per survey wave) choose the lean's block and penalty by held-out waves (`build_population`); the last fold
    also holds out the questions the basis's strength is checked on (otherwise a random fifth of them)."""
    report = progress or (lambda done, total, stage: None)
    names = list(groups)
    if len(names) < 2:
        raise SteerError(f"a population needs at least 2 groups, got {len(names)}", "groups")
    questions = list(groups[names[0]])
    n = len(questions)
    total = 4
    report(0, total, "read questions")
    blocks = lean_blocks(lm)
    read = read_answers(lm, questions, state_layers=blocks,
                        progress=lambda done, count: report(0, total, f"read questions {done}/{count}"))
    report(1, total, "fit question leans")
    population = build_population(groups, read.distributions, read.states, folds)
    population = population.with_known(_known_questions(questions, read, population.layer))

    rng = np.random.default_rng(seed)
    if folds is not None:
        check = sorted(int(i) for i in folds[-1])[:MAX_CHECK_QUESTIONS]
    else:
        check = sorted(rng.choice(n, size=max(1, min(MAX_CHECK_QUESTIONS, n // 5)), replace=False).tolist())
    rest = [i for i in range(n) if i not in set(check)]
    fit_idx = sorted(rng.choice(rest, size=min(MAX_VECTOR_QUESTIONS, len(rest)), replace=False).tolist())
    layers = default_layers(lm)
    vector_layer = layers[len(layers) // 2]
    report(2, total, "read answers for the steering basis")
    used = fit_idx + check
    acts = answer_activations(lm, in_both_orders([questions[i] for i in used]), [vector_layer])
    z = acts.by_layer[vector_layer].double().numpy()
    valid = acts.valid.numpy()
    targets = np.stack([_targets(in_both_orders([groups[g][i] for i in used]), z.shape[1]) for g in names])
    m = len(used)
    in_fit = np.r_[np.arange(len(fit_idx)), m + np.arange(len(fit_idx))]  # both orders of the fit questions
    held_vectors = group_vectors(z[in_fit], valid[in_fit], targets[:, in_fit])

    report(3, total, "choose the steering strength")
    checked = [int(g) for g in np.linspace(0, len(names) - 1, min(MAX_CHECK_GROUPS, len(names))).round()]
    gains = _strength_gains(lm, [questions[i] for i in check], {names[g]: [groups[names[g]][i] for i in check]
                                                               for g in checked},
                            {names[g]: held_vectors[g] for g in checked}, vector_layer)
    best = max(gains, key=lambda s: gains[s][0])
    mean, se = gains[best]
    strength = best if mean - se > 0 else 0.0
    population = population.with_steering(group_vectors(z, valid, targets), vector_layer, strength)
    question_order = rank_by_disagreement(population, read.states, n)
    if strength > 0:  # subjects' answers are read under their vectors: keep what the first-asked questions need
        asked_first = [questions[i] for i in question_order]
        population = population.with_known(population.known, steering_block_inputs(lm, asked_first, vector_layer))
    report(total, total, "done")
    return population, {
        "groups": len(names), "questions": n, "lean_block": population.layer, "vector_layer": vector_layer,
        "strength": strength, "vector_questions": len(fit_idx), "check_questions": len(check),
        "check_groups": [names[g] for g in checked],
        "chat_gain_by_strength": {f"{s:g}": {"mean": m_, "standard_error": e} for s, (m_, e) in gains.items()},
        # The population's own questions, most informative for a new subject first (`next_questions`).
        "question_order": question_order,
    }


def fit_subject_profile(lm: LanguageModel, population: Population, items: Sequence[OpinionItem],
                        penalty: float = SUBJECT_PENALTY) -> Profile:
    """An ordinary (DiffMean-shaped) profile for a subject that answered `items`: its blend of the population's
    vectors at the population's strength, its temperature and its blend of the groups' question leans."""
    if not items:
        raise SteerError("a subject needs at least one answered question", "items")
    lm.check_layer(population.layer, "population.layer")
    if population.hidden_size != lm.hidden_size:
        raise SteerError(f"the population reads {population.hidden_size} hidden units, the model has "
                         f"{lm.hidden_size}", "population")
    known = population.known.lookup(items) if population.known is not None else None
    if known is not None:  # the population's own questions: read unsteered when it was learned
        by_order, states = known
        unsteered = AnswerRead(average_orders(by_order), {population.layer: states}, by_order)
        read_steered = _known_steered_reader(lm, population, items, states)
    else:  # the blocks below the vector's run once for both reads (the steered one runs only those above)
        prompts = PromptsAtBlock(lm, items, population.vector_layer, state_layers=[population.layer])
        unsteered, read_steered = prompts.read(), prompts.read
    first = fit_subject(population, items, unsteered.distributions, unsteered.states, penalty)
    vector = torch.tensor(population.subject_vector(first.weights), dtype=torch.float32)
    fit, served, strength, chat = first, unsteered, 0.0, None
    if population.strength > 0:
        shift: list[Intervention] = [ConstantShift(population.vector_layer, POSITIONS, population.strength * vector)]
        steered = read_steered(shift)
        chat = generation_gain(items, steered.by_order, unsteered.by_order)
        # The build's rule for what chat gets (`steer_core.build`): a steering that moves the subject's own
        # answers away from it, read one order at a time, does not ship; the calibration and lean still do.
        if chat["gain_vs_unsteered"]["mean"] >= 0:
            strength, served = float(population.strength), steered
            fit = fit_subject(population, items, served.distributions, served.states, penalty)
    profile = Profile(method="diffmean", model_name=lm.name, model_fingerprint=lm.fingerprint,
                      layer=population.vector_layer, positions=POSITIONS, strength=strength,
                      tensors={"vector": vector}, calibration=fit.calibration, question_lean=fit.question_lean)
    calibrations = profile.calibrations(items, served.states)
    answers = [c.apply(p, it.ordinal) for c, p, it in zip(calibrations, served.distributions, items, strict=True)]
    profile.metrics = {
        "evaluation": "in-sample", "items": len(items), "orders": 2,
        "unsteered": mean_metrics(item_metrics(items, unsteered.distributions)),
        "steered": mean_metrics(item_metrics(items, answers)),
        "population": {"weights": fit.weight_of(), "steering_weights": first.weight_of(),
                       "population_strength": float(population.strength), "temperature": fit.temperature,
                       "loss": fit.loss},
        "steering_shipped": strength > 0,
        # In-sample (the subject's own answers): what chat would get from the blended vector.
        "generation": None if chat is None else {"steering": strength > 0, **chat},
    }
    profile.sample_hash = sample_hash(items)
    return profile


def next_questions(lm: LanguageModel, population: Population, questions: Sequence[OpinionItem],
                   k: int) -> list[int]:
    """Indices of the `k` of `questions` a new subject should answer first: where the groups' predicted
    leans disagree most (`steer_core.population.informative_questions`), most informative first."""
    if not questions:
        return []
    read = read_answers(lm, questions, state_layers=[population.layer])
    return rank_by_disagreement(population, read.states, k)


def _known_steered_reader(lm: LanguageModel, population: Population, items: Sequence[OpinionItem],
                          states: np.ndarray) -> Callable[[list[Intervention]], AnswerRead]:
    """How a subject's known questions (lean-block `states`) are read under its vector: from the steering
    block's kept inputs when the population kept them for every one (the blocks above only), else whole."""
    kept = population.kept_inputs.lookup(items) if population.kept_inputs is not None else None
    if kept is None:
        return lambda steering: read_answers(lm, items, steering, state_layers=[population.layer])
    lean_above = population.layer >= population.vector_layer  # else the steering does not move its states

    def read(steering: list[Intervention]) -> AnswerRead:
        steered = PromptsAtBlock(lm, items, population.vector_layer, [population.layer] if lean_above else [],
                                 inputs=kept).read(steering)
        return steered if lean_above else AnswerRead(steered.distributions, {population.layer: states},
                                                     steered.by_order)
    return read


def steering_block_inputs(lm: LanguageModel, questions: Sequence[OpinionItem], layer: int) -> KeptInputs | None:
    """The steering block's inputs for the first `KEPT_QUESTIONS` distinct `questions` (most informative first),
    in both orders; None where the model's blocks are not called alike (`blocks_share_inputs`)."""
    first: dict[str, OpinionItem] = {}
    for it in questions:
        if len(first) == KEPT_QUESTIONS:
            break
        first.setdefault(question_key(it), it)
    kept = list(first.values())
    both = in_both_orders(kept)
    if not blocks_share_inputs(lm, [both[0], both[-1]], layer):
        return None
    hidden = block_states(lm, both, layer)
    return KeptInputs(tuple(first), tuple(len(h) for h in hidden), np.concatenate(hidden))


def _known_questions(questions: Sequence[OpinionItem], read: AnswerRead, layer: int) -> KnownQuestions:
    """The population's questions' unsteered reads (`read`, debiased), kept for subjects that answer them."""
    first = {question_key(it): i for i, it in reversed(list(enumerate(questions)))}  # a question asked twice: once
    rows = sorted(first.values())
    k_max = max(len(it.options) for it in questions)
    answers = np.zeros((2, len(rows), k_max))
    for order, dists in enumerate(read.by_order):
        for j, i in enumerate(rows):
            answers[order, j, :len(dists[i])] = dists[i]
    return KnownQuestions(tuple(question_key(questions[i]) for i in rows),
                          tuple(len(questions[i].options) for i in rows), answers, read.states[layer][rows])


def _targets(items: Sequence[OpinionItem], k_max: int) -> np.ndarray:
    out = np.zeros((len(items), k_max))
    for r, item in enumerate(items):
        out[r, :len(item.options)] = item.target
    return out


def _strength_gains(lm: LanguageModel, questions: Sequence[OpinionItem],
                    answers: Mapping[str, Sequence[OpinionItem]], vectors: Mapping[str, np.ndarray],
                    layer: int) -> dict[float, tuple[float, float]]:
    """For each of `VECTOR_STRENGTHS`: the mean over `answers`' groups of the alignment gain that chat would
    see (each order read alone, steered by the group's own vector, against unsteered), and its standard error
    (each group's paired SE over its questions, pooled)."""
    n = len(questions)
    steerings: list[Any] = [None]
    keys: list[tuple[str, float]] = []
    for name in answers:
        vector = torch.tensor(vectors[name], dtype=torch.float32)
        for s in VECTOR_STRENGTHS:
            steerings.append([ConstantShift(layer, POSITIONS, s * vector)])
            keys.append((name, s))
    reads = answer_distributions_under(lm, in_both_orders(questions), steerings, orders=1)
    by_order = [split_orders(r, n) for r in reads]
    base = {name: [sample_alignment(answers[name], order) for order in by_order[0]] for name in answers}
    per_strength: dict[float, list[tuple[float, float]]] = {s: [] for s in VECTOR_STRENGTHS}
    for (name, s), read in zip(keys, by_order[1:], strict=True):
        after = np.mean([sample_alignment(answers[name], order) for order in read], axis=0)
        d = paired_difference(after, np.mean(base[name], axis=0))
        per_strength[s].append((d.mean, d.standard_error))
    return {s: (float(np.mean([m for m, _ in rows])), float(np.sqrt(sum(e * e for _, e in rows)) / len(rows)))
            for s, rows in per_strength.items()}
