"""A population: what many groups that answered the same questions share, learned once; a subject blends it.

One subject's 20 answers are too few to learn how its answers move from question to question (`bench/
group_signal.py` and issue 28: every per-subject learner tried loses to a plain calibration at 20 items). A
survey answered by many groups holds that structure for all of them at once. A `Population` is the
multi-output form of the question lean (`steer_core.question_lean`): one ridge probe from a question's prompt
state (after one block, averaged over the prompt's tokens) to every group's own lean on that question, each
group with its own temperature. A new subject (a group or one person) then fits only its simplex weights over
the groups' predicted leans and its temperature (`fit_subject`): a handful of numbers from a convex fit over
readings already taken, no backward pass through the model. The result is an ordinary profile's parts: a
temperature and a `QuestionLean` whose weight and intercept are the blend of the groups' (the probe is linear,
so blending the leans is blending the probes).

`informative_questions` ranks the questions a new subject should answer first: those on which the groups'
predicted leans disagree most, where one answer tells the blend weights apart the most.

Everything here is plain numbers (numpy arrays and names), for a safetensors body and a JSON header.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from scipy.optimize import LinearConstraint, minimize
from sklearn.linear_model import RidgeCV
from torch import Tensor

from steer_core.calibration import (
    MAX_LEAN,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    Calibration,
    fit_calibration,
    ordinal_z,
)
from steer_core.data import Distribution, OpinionItem
from steer_core.errors import SteerError
from steer_core.question_lean import MIN_LEAN_ITEMS, PENALTIES, QuestionLean, item_leans

MIN_GROUPS = 2
# The subject fit's pull toward uniform weights: `SUBJECT_PENALTY * |w - 1/G|^2` is added to the subject's
# summed (not mean) cross-entropy, so it fades as a subject gives more answers. It is a soft prior, not a
# constraint: the simplex already bounds the subject's lean by the groups', and the penalty only breaks ties
# that 20 answers cannot (groups whose predicted leans nearly coincide). A lean moves one answer's
# cross-entropy by about Var(z) * d^2 / 2 (Var(z) ~ 0.4), so at 0.25 a subject that is plainly one group still
# reaches it (weight 0.94 on the toy of tests/steer_core/test_population.py; 0.83 at 1.0, 0.97 at 0.1).
SUBJECT_PENALTY = 0.25
TENSOR_NAMES = ("population.center", "population.scale", "population.weight", "population.intercept",
                "population.temperatures")
VECTORS_TENSOR = "population.vectors"
KNOWN_ANSWERS_TENSOR = "population.known_answers"
KNOWN_STATES_TENSOR = "population.known_states"
KEPT_INPUTS_TENSOR = "population.kept_inputs"
FILE_KEY = "pluristeer_population"
_FLOOR = 1e-12


def question_key(item: OpinionItem) -> str:
    """What names a question's prompt among a population's known questions: its text and options, in order."""
    payload = json.dumps([item.question, list(item.options)], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass(frozen=True, eq=False)
class KnownQuestions:
    """A population's own questions as its model read them unsteered, kept so that a subject who answers them
    (the service suggests them, most informative first) is fitted without reading them again: question `i`'s
    `question_key`, its option count, its answer distribution in each option order (`answers[order, i]`, the
    reversed order mapped back; zeros past its options) and its prompt state after the lean block (both orders
    averaged)."""

    keys: tuple[str, ...]
    options: tuple[int, ...]
    answers: np.ndarray  # (2, questions, most options)
    states: np.ndarray  # (questions, hidden)

    def __post_init__(self) -> None:
        n = len(self.keys)
        if len(set(self.keys)) != n or not all(isinstance(k, str) and k for k in self.keys):
            raise SteerError("must be distinct non-empty strings", "population.known_questions.keys")
        answers, states = np.asarray(self.answers), np.asarray(self.states)
        if len(self.options) != n or not all(isinstance(k, int) and 2 <= k <= answers.shape[-1]
                                             for k in self.options):
            raise SteerError("must be one option count (2 or more) per question", "population.known_questions.options")
        if answers.ndim != 3 or answers.shape[:2] != (2, n) or not np.isfinite(answers).all() or (answers < 0).any():
            raise SteerError(f"must be non-negative finite numbers of shape (2, {n}, options)",
                             "population.known_questions.answers")
        if states.ndim != 2 or states.shape[0] != n or not np.isfinite(states).all():
            raise SteerError(f"must be finite numbers of shape ({n}, hidden)", "population.known_questions.states")

    def lookup(self, items: Sequence[OpinionItem]) -> tuple[list[list[np.ndarray]], np.ndarray] | None:
        """`items`' answers in each order and their states, as `read_answers` returns them (`by_order`, the lean
        block's states); None unless every item is a known question with its options in the known order."""
        index = {key: i for i, key in enumerate(self.keys)}
        rows = [index.get(question_key(it)) for it in items]
        if any(r is None for r in rows):
            return None
        known = [r for r in rows if r is not None]
        by_order = []
        for order in range(2):
            dists = [np.asarray(self.answers[order, r, :self.options[r]], dtype=float) for r in known]
            by_order.append([p / p.sum() for p in dists])
        return by_order, np.asarray(self.states, dtype=float)[known]


@dataclass(frozen=True, eq=False)
class KeptInputs:
    """What the steering basis's block is called with for the questions a new subject is asked first, so that a
    subject who answered only those is read under its vector running just the blocks above: question `keys[i]`
    in option order `o` (0 as the population read it, 1 reversed) is prompt `o * len(keys) + i`, with
    `lengths` of it tokens whose hidden states are its consecutive rows of `hidden` (prompts in that order)."""

    keys: tuple[str, ...]
    lengths: tuple[int, ...]
    hidden: np.ndarray  # (all the prompts' tokens, hidden)

    def __post_init__(self) -> None:
        if len(set(self.keys)) != len(self.keys) or not all(isinstance(k, str) and k for k in self.keys):
            raise SteerError("must be distinct non-empty strings", "population.kept_inputs.keys")
        if len(self.lengths) != 2 * len(self.keys) or not all(isinstance(n, int) and n > 0 for n in self.lengths):
            raise SteerError("must be one token count (> 0) per question and order", "population.kept_inputs.lengths")
        hidden = np.asarray(self.hidden)
        if hidden.ndim != 2 or hidden.shape[0] != sum(self.lengths) or not np.isfinite(hidden).all():
            raise SteerError(f"must be finite numbers of shape ({sum(self.lengths)}, hidden)",
                             "population.kept_inputs.hidden")

    def lookup(self, items: Sequence[OpinionItem]) -> list[np.ndarray] | None:
        """The kept inputs of `in_both_orders(items)`'s prompts (`PromptsAtBlock`'s `inputs`); None unless
        every item is a kept question with its options in the kept order."""
        index = {key: i for i, key in enumerate(self.keys)}
        rows = [index.get(question_key(it)) for it in items]
        if any(r is None for r in rows):
            return None
        starts = np.concatenate([[0], np.cumsum(self.lengths)])
        n = len(self.keys)
        return [np.asarray(self.hidden[starts[o * n + r]:starts[o * n + r + 1]], dtype=np.float32)
                for o in range(2) for r in rows if r is not None]


@dataclass(frozen=True, eq=False)
class Population:
    """Group `g`'s lean on a question is `((state - center) / scale) @ weight[:, g] + intercept[g]`, `state`
    the prompt's hidden state after block `layer` averaged over its tokens; its temperature `temperatures[g]`.

    The steering basis, what reaches generation: `vectors[g]` is group `g`'s DiffMean direction at block
    `vector_layer` (its answers against the other groups' on the same questions, `group_vectors`); a subject
    steers with its weights' blend of them at `strength` (0: the population found no strength that moved
    held-out answers toward its groups, and subjects carry only their calibration and question lean)."""

    groups: tuple[str, ...]
    layer: int
    center: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # (hidden, groups)
    intercept: np.ndarray  # (groups,)
    temperatures: np.ndarray  # (groups,)
    vectors: np.ndarray | None = None  # (groups, hidden)
    vector_layer: int = 0
    strength: float = 0.0
    known: KnownQuestions | None = None
    kept_inputs: KeptInputs | None = None

    def __post_init__(self) -> None:
        if len(self.groups) < MIN_GROUPS or len(set(self.groups)) != len(self.groups):
            raise SteerError(f"needs at least {MIN_GROUPS} distinct group names", "population.groups")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise SteerError("must be an integer >= 0", "population.layer")
        g = len(self.groups)
        hidden = np.shape(self.center)[0] if np.ndim(self.center) == 1 else -1
        shapes = {"center": (hidden,), "scale": (hidden,), "weight": (hidden, g), "intercept": (g,),
                  "temperatures": (g,)}
        for name, shape in shapes.items():
            value = np.asarray(getattr(self, name))
            if hidden < 1 or value.shape != shape or not np.isfinite(value).all():
                raise SteerError(f"must be finite numbers of shape {shape}", f"population.{name}")
        if not (np.asarray(self.scale) > 0).all():
            raise SteerError("must be > 0 everywhere", "population.scale")
        t = np.asarray(self.temperatures)
        if not ((t >= MIN_TEMPERATURE) & (t <= MAX_TEMPERATURE)).all():
            raise SteerError(f"must lie in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]", "population.temperatures")
        if isinstance(self.vector_layer, bool) or not isinstance(self.vector_layer, int) or self.vector_layer < 0:
            raise SteerError("must be an integer >= 0", "population.vector_layer")
        if isinstance(self.strength, bool) or not isinstance(self.strength, int | float) \
                or not math.isfinite(self.strength) or self.strength < 0:
            raise SteerError("must be a finite number >= 0", "population.strength")
        if self.vectors is None:
            if self.strength != 0:
                raise SteerError("a population without steering vectors steers at strength 0", "population.strength")
        else:
            v = np.asarray(self.vectors)
            if v.ndim != 2 or v.shape[0] != g or v.shape[1] < 1 or not np.isfinite(v).all():
                raise SteerError(f"must be finite numbers of shape ({g}, hidden)", "population.vectors")
        if self.known is not None and np.shape(self.known.states)[1] != hidden:
            raise SteerError(f"must have {hidden} hidden units, as the population", "population.known_questions.states")
        if self.kept_inputs is not None and np.shape(self.kept_inputs.hidden)[1] != hidden:
            raise SteerError(f"must have {hidden} hidden units, as the population", "population.kept_inputs.hidden")

    @property
    def hidden_size(self) -> int:
        return int(np.shape(self.center)[0])

    def tensors(self) -> dict[str, Tensor]:
        values = (self.center, self.scale, self.weight, self.intercept, self.temperatures)
        out = {name: torch.tensor(np.asarray(v), dtype=torch.float32)
               for name, v in zip(TENSOR_NAMES, values, strict=True)}
        if self.vectors is not None:
            out[VECTORS_TENSOR] = torch.tensor(np.asarray(self.vectors), dtype=torch.float32)
        if self.known is not None:
            out[KNOWN_ANSWERS_TENSOR] = torch.tensor(np.asarray(self.known.answers), dtype=torch.float32)
            out[KNOWN_STATES_TENSOR] = torch.tensor(np.asarray(self.known.states), dtype=torch.float32)
        if self.kept_inputs is not None:
            out[KEPT_INPUTS_TENSOR] = torch.tensor(np.asarray(self.kept_inputs.hidden), dtype=torch.float32)
        return out

    def to_json(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"groups": list(self.groups), "layer": self.layer, "vector_layer": self.vector_layer,
                                "strength": self.strength}
        if self.known is not None:
            meta["known_questions"] = {"keys": list(self.known.keys), "options": list(self.known.options)}
        if self.kept_inputs is not None:
            meta["kept_inputs"] = {"keys": list(self.kept_inputs.keys), "lengths": list(self.kept_inputs.lengths)}
        return meta

    @classmethod
    def from_parts(cls, meta: Any, tensors: Mapping[str, Tensor]) -> Population:
        """Validate stored parts (`to_json()` and the tensors of `tensors()`) into a population."""
        keys = {"groups", "layer", "vector_layer", "strength"}
        if not isinstance(meta, dict) or not keys <= set(meta) <= keys | {"known_questions", "kept_inputs"}:
            raise SteerError(f"must be an object with {', '.join(sorted(keys))} and optionally known_questions "
                             "and kept_inputs", "population")
        groups = meta["groups"]
        if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
            raise SteerError("must be a list of non-empty strings", "population.groups")
        missing = [name for name in TENSOR_NAMES if name not in tensors]
        if missing:
            raise SteerError(f"tensor {missing[0]!r} is missing", "population")
        center, scale, weight, intercept, temperatures = (tensors[n].double().numpy() for n in TENSOR_NAMES)
        vectors = tensors[VECTORS_TENSOR].double().numpy() if VECTORS_TENSOR in tensors else None
        return cls(tuple(groups), meta["layer"], center, scale, weight, intercept, temperatures, vectors,
                   meta["vector_layer"], meta["strength"], _known_from_parts(meta.get("known_questions"), tensors),
                   _kept_from_parts(meta.get("kept_inputs"), tensors))

    def to_bytes(self) -> bytes:
        """A safetensors file: the tensors in its body, `to_json()` in its header (never pickled)."""
        tensors = {k: v.contiguous() for k, v in self.tensors().items()}
        return st_save(tensors, metadata={FILE_KEY: json.dumps(self.to_json(), allow_nan=False)})

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "population") -> Population:
        """Read and validate a file `to_bytes` wrote; anything else is a `SteerError` naming `source`."""
        try:
            tensors = st_load(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"][FILE_KEY])
            return cls.from_parts(meta, tensors)
        except SteerError as exc:
            raise SteerError(f"not a valid population: {exc.field}: {exc.message}", source) from None
        except (SafetensorError, ValueError, KeyError, TypeError) as exc:
            raise SteerError(f"not a valid population: {exc}", source) from None

    def with_steering(self, vectors: np.ndarray | None, vector_layer: int, strength: float) -> Population:
        """This population with another steering basis (`group_vectors`) and strength."""
        return dataclasses.replace(self, vectors=vectors, vector_layer=vector_layer, strength=strength)

    def with_known(self, known: KnownQuestions | None, kept_inputs: KeptInputs | None = None) -> Population:
        """This population keeping `known` as its own questions' unsteered reads, and `kept_inputs` as the
        inputs of its steering block for the questions it asks first."""
        return dataclasses.replace(self, known=known, kept_inputs=kept_inputs)

    def subject_vector(self, weights: np.ndarray) -> np.ndarray:
        """A subject's steering direction: its weights' blend of the groups' vectors (zeros without a basis)."""
        w = np.asarray(weights, dtype=float)
        if w.shape != (len(self.groups),) or not np.isfinite(w).all():
            raise SteerError(f"must be {len(self.groups)} finite numbers, one per group", "weights")
        if self.vectors is None:
            return np.zeros(self.hidden_size)
        return np.asarray(self.vectors, dtype=float).T @ w


def _stored_part(meta: Any, lists: tuple[str, str], tensor_names: Sequence[str], tensors: Mapping[str, Tensor],
                 field: str) -> tuple[tuple[Any, ...], tuple[Any, ...], list[np.ndarray]] | None:
    """An optional stored part (`known_questions`, `kept_inputs`): its header's two lists, as tuples, and its
    tensors (float32, as stored); None when the header has no such part."""
    if meta is None:
        return None
    if not isinstance(meta, dict) or set(meta) != set(lists) or not all(isinstance(meta[k], list) for k in lists):
        raise SteerError(f"must be an object with the lists {lists[0]} and {lists[1]}", field)
    missing = [name for name in tensor_names if name not in tensors]
    if missing:
        raise SteerError(f"tensor {missing[0]!r} is missing", "population")
    return tuple(meta[lists[0]]), tuple(meta[lists[1]]), [tensors[name].numpy() for name in tensor_names]


def _known_from_parts(meta: Any, tensors: Mapping[str, Tensor]) -> KnownQuestions | None:
    part = _stored_part(meta, ("keys", "options"), (KNOWN_ANSWERS_TENSOR, KNOWN_STATES_TENSOR), tensors,
                        "population.known_questions")
    if part is None:
        return None
    keys, options, (answers, states) = part
    return KnownQuestions(keys, options, answers, states)


def _kept_from_parts(meta: Any, tensors: Mapping[str, Tensor]) -> KeptInputs | None:
    part = _stored_part(meta, ("keys", "lengths"), (KEPT_INPUTS_TENSOR,), tensors, "population.kept_inputs")
    if part is None:
        return None
    keys, lengths, (hidden,) = part
    return KeptInputs(keys, lengths, hidden)


@dataclass(frozen=True, eq=False)
class SubjectFit:
    """A subject fitted against a population: its weight per group (on the simplex), its temperature, and the
    blended probe; `calibration` and `question_lean` are what an ordinary profile carries (strength 0)."""

    groups: tuple[str, ...]
    weights: np.ndarray
    temperature: float
    question_lean: QuestionLean
    loss: float  # the mean cross-entropy of the subject's targets at the fit (without the penalty)

    @property
    def calibration(self) -> Calibration:
        """The profile's calibration: the temperature; its lean is read off each question by `question_lean`."""
        return Calibration(self.temperature, 0.0)

    def weight_of(self) -> dict[str, float]:
        return {g: float(w) for g, w in zip(self.groups, self.weights, strict=True)}


def build_population(groups: Mapping[str, Sequence[OpinionItem]], dists: Sequence[Distribution],
                     states: Mapping[int, np.ndarray], folds: Sequence[Sequence[int]] | None = None) -> Population:
    """Learn the population from groups that answered the same questions (only their targets differ), given
    the unsteered readings `dists` (one per question) and the questions' states per candidate block (block ->
    (questions, hidden)). Each group gets the temperature that fits all its items and each item's own best
    lean at that temperature; one ridge maps standardized states to all groups' leans at once, on the block
    and penalty with the least leave-one-out error (one penalty shared by the groups: the probe learns what
    they share). With `folds` (question indices, e.g. one fold per survey wave) the block and penalty are
    chosen by the folds' held-out error instead: questions of one wave share topics, so leave-one-out on
    them rewards a probe that memorizes topics (on OpinionsQA it picked a block whose leans lost to no lean
    at all on new waves, `bench/population.py`)."""
    names = list(groups)
    if len(names) < MIN_GROUPS:
        raise SteerError(f"a population needs at least {MIN_GROUPS} groups, got {len(names)}", "groups")
    n = len(dists)
    for name in names:
        if len(groups[name]) != n:
            raise SteerError(f"group {name!r} has {len(groups[name])} items for {n} distributions; every group "
                             "answers the same questions", "groups")
    if n < MIN_LEAN_ITEMS:
        raise SteerError(f"a population needs at least {MIN_LEAN_ITEMS} shared questions, got {n}", "dists")
    _check_states(states, n)
    first = groups[names[0]]
    for name in names[1:]:
        for a, b in zip(first, groups[name], strict=True):
            if len(a.options) != len(b.options):
                raise SteerError(f"group {name!r}'s items are not the same questions as {names[0]!r}'s", "groups")
    temperatures = np.array([fit_calibration(groups[g], dists, lean=False).temperature for g in names])
    leans = np.column_stack([item_leans(groups[g], dists, t) for g, t in zip(names, temperatures, strict=True)])
    if folds is not None:
        _check_folds(folds, n)
    best: tuple[float, Population] | None = None
    for layer, x in states.items():
        x = np.asarray(x, dtype=float)
        center, scale = x.mean(0), x.std(0) + 1e-6
        if folds is None:
            ridge = RidgeCV(alphas=PENALTIES).fit((x - center) / scale, leans)  # efficient leave-one-out
            error = -float(ridge.best_score_)  # mean squared leave-one-out error over questions and groups
        else:
            errors = _fold_errors(x, leans, folds)
            error = float(errors.min())
            ridge = RidgeCV(alphas=[float(PENALTIES[int(errors.argmin())])]).fit((x - center) / scale, leans)
        if best is None or error < best[0]:
            population = Population(tuple(names), int(layer), center, scale, np.asarray(ridge.coef_).T.copy(),
                                    np.asarray(ridge.intercept_, dtype=float).copy(), temperatures)
            best = (error, population)
    assert best is not None
    return best[1]


def group_vectors(activations: np.ndarray, valid: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each group's DiffMean direction against the other groups (groups, hidden): `activations` (questions,
    options, hidden) at the answer letter of each option, `valid` (questions, options) its real options,
    `targets` (groups, questions, options) each group's answer distribution. Group g weighs option k of a
    question by `q_gk - c_k`, `c` the mean of the other groups' distributions there, so what every group
    answers cancels and the vector carries the group's own difference (`steer_core.diffmean`'s contrast form,
    with the same scale: weights divided by the mean total variation from the others)."""
    z = np.asarray(activations, dtype=float)
    q = np.where(np.asarray(valid, dtype=bool)[None], np.asarray(targets, dtype=float), 0.0)
    g = q.shape[0]
    if g < MIN_GROUPS or q.shape[1:] != z.shape[:2]:
        raise SteerError(f"targets must be (groups >= {MIN_GROUPS}, {z.shape[0]}, {z.shape[1]}), got {q.shape}",
                         "targets")
    others = (q.sum(axis=0, keepdims=True) - q) / (g - 1)
    weight = q - others  # (groups, questions, options)
    spread = np.maximum(0.5 * np.abs(weight).sum(axis=2).mean(axis=1), 1e-12)  # (groups,)
    return np.einsum("gnk,nkd->gd", weight, z) / z.shape[0] / spread[:, None]


def group_leans(population: Population, states: Mapping[int, np.ndarray]) -> np.ndarray:
    """Each group's predicted lean on each question (questions x groups), from the questions' states (block ->
    (questions, hidden); the population's block is read). Not clipped: a subject's lean is
    `clip(group_leans @ weights)`, what its `QuestionLean` computes."""
    x = _layer_states(population, states)
    return ((x - population.center) / population.scale) @ population.weight + population.intercept


def subject_lean(population: Population, weights: np.ndarray) -> QuestionLean:
    """The question lean of a blend of the population's groups: the probes' weights and intercepts blended."""
    w = np.asarray(weights, dtype=float)
    if w.shape != (len(population.groups),) or not np.isfinite(w).all():
        raise SteerError(f"must be {len(population.groups)} finite numbers, one per group", "weights")
    return QuestionLean(population.layer, np.asarray(population.center, dtype=float).copy(),
                        np.asarray(population.scale, dtype=float).copy(), population.weight @ w,
                        float(population.intercept @ w))


def fit_subject(population: Population, items: Sequence[OpinionItem], dists: Sequence[Distribution],
                states: Mapping[int, np.ndarray], penalty: float = SUBJECT_PENALTY) -> SubjectFit:
    """Fit a subject's weights over the groups (on the simplex) and its temperature to its answers: minimize
    the summed cross-entropy of its targets under `p ∝ p^(1/T) exp(clip(leans @ w) z)` plus
    `penalty * |w - 1/G|^2` (`SUBJECT_PENALTY` says why). Without the lean's clip the problem is convex in
    (1/T, w), so SLSQP on the simplex finds its one optimum. `dists` are the unsteered readings of the
    subject's questions and `states` their states (block -> (items, hidden))."""
    if not items:
        raise SteerError("a subject needs at least one answered question", "items")
    if len(dists) != len(items):
        raise SteerError(f"needs one distribution per item: {len(dists)} for {len(items)} items", "dists")
    if not (math.isfinite(penalty) and penalty >= 0):
        raise SteerError("must be a finite number >= 0", "penalty")
    _check_states({population.layer: _layer_states(population, states)}, len(items))
    g = len(population.groups)
    leans = group_leans(population, states)
    k = max(len(it.options) for it in items)
    log_p = np.zeros((len(items), k))
    z = np.zeros((len(items), k))
    q = np.zeros((len(items), k))
    valid = np.zeros((len(items), k), dtype=bool)
    for r, (item, p) in enumerate(zip(items, dists, strict=True)):
        m = len(item.options)
        if len(p) != m:
            raise SteerError(f"item {r} has {m} options but its distribution {len(p)}", "dists")
        log_p[r, :m] = np.log(np.maximum(np.asarray(p, dtype=float), _FLOOR))
        z[r, :m] = ordinal_z(item.ordinal)
        q[r, :m] = item.target
        valid[r, :m] = True
    uniform = np.full(g, 1.0 / g)

    def cross_entropy(x: np.ndarray) -> tuple[float, np.ndarray]:
        inv_t, w = x[0], x[1:]
        raw = leans @ w
        lean = np.clip(raw, -MAX_LEAN, MAX_LEAN)
        logits = np.where(valid, inv_t * log_p + lean[:, None] * z, -np.inf)
        top = logits.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        probs = np.exp(logits - lse[:, None])
        ce = float((q * (lse[:, None] - np.where(valid, logits, 0.0))).sum())
        residual = probs - q
        grad_t = float((residual * log_p).sum())
        d_lean = (residual * z).sum(axis=1) * (np.abs(raw) < MAX_LEAN)
        return ce, np.concatenate([[grad_t], leans.T @ d_lean])

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        ce, grad = cross_entropy(x)
        gap = x[1:] - uniform
        grad[1:] += 2.0 * penalty * gap
        return ce + penalty * float(gap @ gap), grad

    inv_t0 = float(np.mean(1.0 / np.asarray(population.temperatures)))
    x0 = np.concatenate([[inv_t0], uniform])
    bounds = [(1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE)] + [(0.0, 1.0)] * g
    simplex = LinearConstraint(np.concatenate([[0.0], np.ones(g)])[None, :], 1.0, 1.0)
    result = minimize(objective, x0, jac=True, method="SLSQP", bounds=bounds, constraints=simplex,
                      options={"ftol": 1e-12, "maxiter": 500})
    x = result.x if np.isfinite(result.x).all() else x0
    w = np.clip(x[1:], 0.0, None)
    w = w / w.sum() if w.sum() > 0 else uniform
    inv_t = float(np.clip(x[0], *bounds[0]))
    ce = cross_entropy(np.concatenate([[inv_t], w]))[0] / len(items)
    return SubjectFit(population.groups, w, 1.0 / inv_t, subject_lean(population, w), ce)


def informative_questions(population: Population, states: Mapping[int, np.ndarray], k: int) -> list[int]:
    """The `k` questions (indices into `states`' rows) on which the groups' predicted leans disagree most (their
    variance across groups, each clipped as a group's own lean would be), most informative first: where one
    answer moves a subject's weights the most."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise SteerError("must be an integer >= 0", "k")
    spread = np.clip(group_leans(population, states), -MAX_LEAN, MAX_LEAN).var(axis=1)
    order = np.argsort(-spread, kind="stable")
    return [int(i) for i in order[:k]]


def _fold_errors(x: np.ndarray, y: np.ndarray, folds: Sequence[Sequence[int]]) -> np.ndarray:
    """The mean squared held-out error of a ridge (standardized on the rest) for each of `PENALTIES`, over
    `folds`: one SVD per fold serves every penalty."""
    squared = np.zeros(len(PENALTIES))
    count = 0
    for fold in folds:
        held = np.asarray(fold, dtype=int)
        rest = np.setdiff1d(np.arange(len(x)), held)
        center, scale = x[rest].mean(0), x[rest].std(0) + 1e-6
        train, test = (x[rest] - center) / scale, (x[held] - center) / scale
        y_mean = y[rest].mean(0)
        u, sv, vt = np.linalg.svd(train, full_matrices=False)
        uty = u.T @ (y[rest] - y_mean)
        projected = test @ vt.T
        for a, alpha in enumerate(PENALTIES):
            predicted = projected @ ((sv / (sv ** 2 + alpha))[:, None] * uty) + y_mean
            squared[a] += float(((predicted - y[held]) ** 2).sum())
        count += held.size * y.shape[1]
    return squared / count


def _check_folds(folds: Sequence[Sequence[int]], n: int) -> None:
    seen = [int(i) for fold in folds for i in fold]
    if len(folds) < 2 or sorted(seen) != list(range(n)) or any(len(fold) == 0 for fold in folds):
        raise SteerError(f"must be at least 2 non-empty folds that cover the {n} questions once each", "folds")


def _layer_states(population: Population, states: Mapping[int, np.ndarray]) -> np.ndarray:
    if population.layer not in states:
        raise SteerError(f"needs the questions' states after block {population.layer}", "states")
    x = np.asarray(states[population.layer], dtype=float)
    if x.ndim != 2 or x.shape[1] != population.hidden_size:
        raise SteerError(f"block {population.layer}'s states must be (questions, {population.hidden_size}), "
                         f"got {x.shape}", "states")
    return x


def _check_states(states: Mapping[int, np.ndarray], n: int) -> None:
    if not states:
        raise SteerError("needs the questions' states after at least one block", "states")
    for layer, x in states.items():
        shape = np.shape(x)
        if len(shape) != 2 or shape[0] != n or shape[1] < 1:
            raise SteerError(f"block {layer}'s states must be (questions={n}, hidden), got {shape}", "states")
        if not np.isfinite(np.asarray(x, dtype=float)).all():
            raise SteerError(f"block {layer}'s states must be finite", "states")
