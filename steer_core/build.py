"""`build_profile`: the one entry point that turns a sample into a profile, for every method.

Every build chooses its own hyperparameters by k-fold cross-validation: it fits each candidate layer on
the whole sample (the profiles it may ship) and on each fold's complement, scores a small grid of
strengths on each fold's own items, and keeps the (layer, strength) with the best mean alignment over
all items, each judged by a profile that never saw it.

Every profile carries an output calibration (`steer_core.calibration`: a temperature and, when it helps
out of fold, an ordinal lean). A small model is over-confident on opinion questions, so flattening alone
raises alignment for any group; the selection therefore compares each candidate after its own
calibration (fitted out of fold on the candidate's readings of the other folds' items) with the unsteered
model after its own, and ships steering only when it beats that calibrated baseline: otherwise strength 0
and the calibration alone. The metrics record the baselines (unsteered, uniform, calibrated), the choice,
and the best setting's per-item gains over unsteered and over calibrated with standard errors, so a
reader can tell a clear gain from a lucky one; `per_item` keeps each item's out-of-fold alignment
unsteered, calibrated and as shipped (the first PER_ITEM_LIMIT items), for a reader who wants to see which
items moved.

After the selection a build may replace the calibration's one lean by a question lean
(`steer_core.question_lean`: each question's lean read off its prompt's hidden state by a ridge probe),
built and judged out of fold on the readings of what ships, against the plain calibration by the same
measure as the selection; it ships only when it wins, and reads blocks below the shipped steering's.

With a contrast (every item carries the answers of the groups to be told apart from), the selection
judges each candidate by its specificity instead: its gain over the calibrated floor in alignment with the
group minus its gain in alignment with the contrast, among candidates that do not lower the group's own
alignment. A setting that only flattens (or only moves every group alike) scores about 0 and does not ship.

Cross-fitted calibration of a candidate reads other folds' readings, made by profiles fitted on samples
that include the judged fold: the judged items' targets reach their own calibration only through two
fitted numbers of another fold's steering, a leak small next to the folds' own noise (said, not hidden).

The standard error is reported, not enforced: a one-standard-error rule (ship only a gain above it) was
tried on OpinionsQA (20 items, 3 folds) and stopped an ODESteer build that won by +0.007 out of fold and
lost 0.09 on other questions, but also four COLD-FD and COLD-Kernel builds whose gains held on other
questions (+0.035 to +0.071): with 20 items one standard error is about the size of a real gain.

Option orders (`orders`, default 2): every method fits on each item twice, in its options' order and
reversed (letters re-assigned, targets permuted with them), and every reading the selection, the
calibration and the question lean see is the order-averaged one (`steer_core.prompts`: both orders read
and averaged), which is what the debiased readers (`/v1/score`, eval, the offline comparison) serve. So an
option's letter cannot carry the signal, and what was chosen is what is served in any option order.
`orders = 1` fits and reads in the survey's order only (half the reads; on held-out OpinionsQA waves such
profiles lost up to 0.18 alignment against a calibration once the options were reversed).

What a profile does is said plainly (`steer_core.verdict`): `metrics["verdict"]` says what it serves
(steering, the calibrated model or the unsteered model), whether its answers are near uniform, and whether
it improved, meaning what ships beats both the calibrated model and uniform answers by more than one
standard error out of fold; `metrics["generation"]` is what chat gets (the steering alone, uncalibrated,
read one option order at a time, against unsteered). A candidate whose out-of-fold gain for chat is negative
cannot ship, however it reads once calibrated and averaged over orders: a push toward one letter averages
out over the two orders into mere flattening, which a calibration then undoes, while chat, which reads one
order, would get the push.

Why folds, not one held-out share: with 20 items a single split judges on 6, and which 6 decides the
choice (on OpinionsQA a split whose 6 items the model answered badly shipped profiles that hurt the
other questions); every item judging once spreads that luck over the whole sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import numpy as np

from steer_core.activations import reuse_answer_activations
from steer_core.calibration import (
    Calibration,
    calibrate_out_of_fold,
    choose_calibration,
    fit_calibration,
    sample_alignment,
)
from steer_core.data import OpinionItem, reverse_options, sample_hash
from steer_core.errors import SteerError
from steer_core.evaluation import paired_difference, uniform_distributions
from steer_core.folds import FOLDS, HELDOUT_SHARE, MIN_HELDOUT, MIN_TRAIN, fold_indices, split_sample  # noqa: F401
from steer_core.method_spec import DEFAULT_ORDERS, check_build_params
from steer_core.method_spec import ORDERS as ORDERS  # importable from here as before
from steer_core.methods import fit_settings, get_method
from steer_core.metrics import item_metrics, mean_metrics
from steer_core.models import LanguageModel
from steer_core.option_orders import average_orders, in_both_orders, split_orders
from steer_core.profile import Profile
from steer_core.prompts import answer_distributions_under, read_answers, reuse_block_inputs
from steer_core.question_lean import MIN_LEAN_ITEMS, QuestionLean, fit_for_sample, lean_out_of_fold
from steer_core.verdict import Serves, generation_gain, judge

# progress(done, total, stage)
Progress = Callable[[int, int, str], None]

SELECTION_METRIC = "alignment"
# A setting must beat unsteered by more than this much mean alignment to ship.
MIN_GAIN = 1e-4
# `metrics["per_item"]` keeps at most this many items (a profile's metrics travel in its file and its API
# document), each question cut to QUESTION_CHARS characters.
PER_ITEM_LIMIT = 500
QUESTION_CHARS = 120
LEAN_BLOCKS = 8  # blocks a question lean may read (spread over the depth: the probe picks one)
# A question lean is considered for samples of at least this many items. On OpinionsQA (three attribute
# pairs, three seeds, `bench/group_signal.py`) the out-of-fold choice on 20 or 50 items shipped leans that
# lost on other questions (at 50: -0.004 to -0.019 alignment per group); from 100 items the leans it shipped
# gained for all six groups.
MIN_LEAN_SAMPLE = 100


def in_orders(items: Sequence[OpinionItem], orders: int) -> list[OpinionItem]:
    """The items a method fits on: each item, and with `orders = 2` also its options reversed."""
    return list(items) + ([reverse_options(it) for it in items] if orders == 2 else [])


def per_item_record(items: Sequence[OpinionItem], unsteered: np.ndarray, calibrated: np.ndarray | None,
                    steered: np.ndarray) -> dict[str, Any]:
    """Each item's alignment unsteered, calibrated (None: no calibration was fitted) and as shipped, for the
    first PER_ITEM_LIMIT items: `{"metric", "total", "limit", "items": [{"index", "id", "question",
    "unsteered", "calibrated", "steered"}]}`; `total` counts the whole sample."""
    def value(values: np.ndarray | None, i: int) -> float | None:
        return None if values is None else round(float(values[i]), 6)

    rows = []
    for i, it in enumerate(items[:PER_ITEM_LIMIT]):
        question = it.question if len(it.question) <= QUESTION_CHARS else it.question[:QUESTION_CHARS - 1] + "…"
        rows.append({"index": i, "id": it.id, "question": question, "unsteered": value(unsteered, i),
                     "calibrated": value(calibrated, i), "steered": value(steered, i)})
    return {"metric": SELECTION_METRIC, "total": len(items), "limit": PER_ITEM_LIMIT, "items": rows}


def _gain(after: np.ndarray, before: np.ndarray) -> dict[str, float]:
    d = paired_difference(after, before)
    return {SELECTION_METRIC: d.mean, "standard_error": d.standard_error}


def contrast_items(items: Sequence[OpinionItem]) -> list[OpinionItem] | None:
    """The items with their contrast as the target, when every item has one (else None)."""
    contrasted = [replace(it, target=it.contrast) for it in items if it.contrast is not None]
    return contrasted if len(contrasted) == len(items) else None


Setting = TypeVar("Setting", bound=Hashable)  # what identifies a candidate, e.g. (layer, strength index)


@dataclass
class Selection(Generic[Setting]):
    """What `select_setting` chose. `best`: the candidate with the best out-of-fold score (`search`: calibrated
    alignment, or specificity when `by_specificity`); `improved`: it beats the calibrated unsteered model
    (else strength 0 ships); `calibration`: the map that ships (fitted on every item's reading of the shipped
    setting); `baselines` and `best_items`: per-item metrics (`metrics.item_metrics`), every one out of fold;
    `calibrated` and `best_answers`: the calibrated unsteered model's and the best candidate's calibrated
    answer distributions, out of fold."""

    best: Setting | None
    improved: bool
    calibration: Calibration
    lean: bool
    search: dict[Setting, float]
    baselines: dict[str, dict[str, np.ndarray]]
    best_items: dict[str, np.ndarray]
    calibrated: list[np.ndarray]
    best_answers: list[np.ndarray]
    by_specificity: bool = False

    @property
    def shipped_items(self) -> dict[str, np.ndarray]:
        """Per-item metrics of what ships: the best candidate when it improved, else the calibrated model."""
        return self.best_items if self.improved else self.baselines["calibrated"]

    @property
    def shipped_answers(self) -> list[np.ndarray]:
        return self.best_answers if self.improved else self.calibrated


def select_setting(items: Sequence[OpinionItem], unsteered: Sequence[np.ndarray],
                   candidates: Mapping[Setting, Sequence[np.ndarray]], folds: Sequence[Sequence[int]],
                   min_gain: float = MIN_GAIN, eligible: Collection[Setting] | None = None) -> Selection[Setting]:
    """Choose among `candidates` (setting -> out-of-fold answer distributions, one per item), each judged
    after its own calibration, itself fitted out of fold (each fold's items mapped by a fit on the other
    folds' readings), against the unsteered model with its out-of-fold calibration (the floor):

    - without a contrast: by mean alignment; the best ships if it beats the floor by more than `min_gain`;
    - when every item carries a `contrast` (the answers of the groups to be told apart from): by
      specificity, the gain over the floor in alignment with the item's own target minus the gain in
      alignment with its contrast, among candidates whose own gain is not negative; the best ships if
      its specificity exceeds `min_gain`. Flattening moves both alignments alike and scores about 0, so
      steering ships only for what tells the group apart, and never at a loss to the group itself.

    `eligible` (None: all) are the candidates that may ship; `best` is the best of them (the best of all when
    none is eligible, which then does not ship).
    """
    calibration, calibrated, lean = choose_calibration(items, unsteered, folds)
    baselines = {"unsteered": item_metrics(items, unsteered),
                 "uniform": item_metrics(items, uniform_distributions(items)),
                 "calibrated": item_metrics(items, calibrated)}
    floor = baselines["calibrated"][SELECTION_METRIC]
    others = contrast_items(items)
    others_floor = sample_alignment(others, calibrated) if others is not None else None
    search: dict[Setting, float] = {}
    best: tuple[float, Setting, list[np.ndarray], bool] | None = None
    for key, dists in candidates.items():
        mapped = calibrate_out_of_fold(items, dists, folds, lean)
        own = sample_alignment(items, mapped)
        if others is None:
            search[key] = float(own.mean())
            margin = search[key] - float(floor.mean())
        else:
            own_gain = float((own - floor).mean())
            search[key] = own_gain - float((sample_alignment(others, mapped) - others_floor).mean())
            margin = search[key] if own_gain >= 0 else -math.inf
        may_ship = eligible is None or key in eligible
        # Eligible candidates first, then by margin.
        if best is None or (may_ship, margin) > (best[3], best[0]):
            best = (margin, key, mapped, may_ship)
    if best is None:
        return Selection(None, False, calibration, lean, search, baselines, baselines["calibrated"], calibrated,
                         calibrated, others is not None)
    improved = best[3] and best[0] > min_gain
    if improved:
        calibration = fit_calibration(items, candidates[best[1]], lean)
    return Selection(best[1], improved, calibration, lean, search, baselines, item_metrics(items, best[2]),
                     calibrated, best[2], others is not None)


def lean_blocks(lm: LanguageModel) -> list[int]:
    """The blocks whose states a question lean may read: LEAN_BLOCKS spread evenly over the model's depth."""
    return sorted({round(k * (lm.num_layers - 1) / (LEAN_BLOCKS - 1)) for k in range(LEAN_BLOCKS)})


def choose_question_lean(items: Sequence[OpinionItem], readings: Sequence[np.ndarray],
                         states: Mapping[int, np.ndarray], chosen: Selection[Any],
                         folds: Sequence[Sequence[int]], min_items: int = MIN_LEAN_SAMPLE
                         ) -> tuple[QuestionLean | None, dict[str, Any], dict[str, np.ndarray], list[np.ndarray]]:
    """Whether a question lean (`steer_core.question_lean`) beats the plain calibration of what ships, both
    built out of fold on `readings` (what ships, read out of fold) and judged as the selection judges (by
    specificity when the items carry a contrast); considered for samples of at least `min_items` items.
    Returns the lean to ship (None: the plain calibration stays), its record for the metrics, and the
    per-item metrics and answers (out of fold) of what ships."""
    skipped = None
    if len(items) < min_items:
        skipped = f"a question lean is considered from {min_items} items; this sample has {len(items)}"
    elif not states:
        skipped = "no block below the shipped steering to read"
    elif len(items) - max(len(fold) for fold in folds) < MIN_LEAN_ITEMS:
        skipped = f"a fold's complement holds fewer than {MIN_LEAN_ITEMS} items"
    if skipped is not None:
        return None, {"shipped": False, "layer": None, "note": skipped}, chosen.shipped_items, chosen.shipped_answers
    plain = calibrate_out_of_fold(items, readings, folds, chosen.lean)
    leaned = lean_out_of_fold(items, readings, states, folds, chosen.lean)
    own = sample_alignment(items, leaned)
    gain = _gain(own, sample_alignment(items, plain))
    others = contrast_items(items)
    if others is None:
        margin = gain[SELECTION_METRIC]
    else:
        contrast_gain = float((sample_alignment(others, leaned) - sample_alignment(others, plain)).mean())
        margin = gain[SELECTION_METRIC] - contrast_gain if gain[SELECTION_METRIC] >= 0 else -math.inf
    record: dict[str, Any] = {"shipped": bool(margin > MIN_GAIN), "blocks": sorted(states),
                              "gain_vs_calibration": gain,
                              "metric": "specificity" if others is not None else SELECTION_METRIC,
                              "margin": margin if math.isfinite(margin) else None}
    if not record["shipped"]:
        return None, {**record, "layer": None}, chosen.shipped_items, chosen.shipped_answers
    lean = fit_for_sample(items, readings, states, chosen.calibration.temperature)
    return lean, {**record, "layer": lean.layer}, item_metrics(items, leaned), leaned


@reuse_answer_activations()  # the folds refit on subsets of the items the full fit has read
@reuse_block_inputs()
def build_profile(lm: LanguageModel, items: Sequence[OpinionItem], method: str,
                  params: dict[str, Any] | None = None, progress: Progress | None = None,
                  seed: int = 0) -> Profile:
    """Build a profile of `method` from `items`.

    `params` may fix `layer`, `strength` and `positions`, plus the method's own parameters. With both
    `layer` and `strength` given nothing is searched or calibrated (the identity calibration) and the
    scores reported are in-sample.
    """
    spec = get_method(method)
    if not items:
        raise SteerError("the sample is empty", "items")
    # A layer or strength of None is not fixed: searched, as if absent.
    given = {k: v for k, v in (params or {}).items() if not (k in ("layer", "strength") and v is None)}
    own = check_build_params(spec, given, check_layer=lm.check_layer)  # the service's request check too
    layer = own.pop("layer", None)
    strength = own.pop("strength", None)
    positions = own.pop("positions", spec.default_positions)
    orders = own.pop("orders", DEFAULT_ORDERS)
    report = progress or (lambda done, total, stage: None)

    if layer is not None and strength is not None:
        report(0, 3, "fit")
        profile = spec.fit(lm, in_orders(items, orders), [layer], own, positions)[layer]
        profile.strength = float(strength)
        report(1, 3, "score")
        steering = [spec.intervention(profile, lm)] if profile.strength != 0 else None
        unsteered_read = read_answers(lm, items, orders=orders)
        steered_read = read_answers(lm, items, steering, orders=orders) if steering else unsteered_read
        before = item_metrics(items, unsteered_read.distributions)
        after = item_metrics(items, steered_read.distributions)
        report(3, 3, "done")
        uniform = item_metrics(items, uniform_distributions(items))[SELECTION_METRIC]
        # Nothing was calibrated: the unsteered model is the calibrated floor here.
        verdict = judge(after[SELECTION_METRIC], before[SELECTION_METRIC], uniform, steered_read.distributions,
                        "steering" if steering else "unsteered model")
        profile.metrics = {"evaluation": "in-sample", "orders": orders, "unsteered": mean_metrics(before),
                           "steered": mean_metrics(after), "search": None, "steering_shipped": bool(steering),
                           "improved": verdict.improved, "verdict": verdict.to_json(),
                           "generation": {"steering": bool(steering), **generation_gain(
                               items, steered_read.by_order, unsteered_read.by_order, contrast_items(items))},
                           "per_item": per_item_record(items, before[SELECTION_METRIC], None,
                                                       after[SELECTION_METRIC])}
        profile.sample_hash = sample_hash(items)
        return profile

    folds = fold_indices(len(items), seed=seed)
    layers = [layer] if layer is not None else spec.layers(lm)
    settings = spec.grid(own)  # the method's own hyperparameters to compare (one setting for most methods)
    varied = sorted(k for k in settings[0] if len({repr(s[k]) for s in settings}) > 1)
    total = 2 + len(folds) * (1 + len(layers))
    report(0, total, "fit")
    # What ships; its grids name the candidates. full[v][L]: setting v fitted at layer L on every item.
    full = fit_settings(spec, lm, in_orders(items, orders), layers, settings, positions)
    grids = {(v, L): ([float(strength)] if strength is not None else spec.strengths(full[v][L], lm))
             for v in range(len(settings)) for L in layers}
    report(1, total, "score unsteered")
    # The unsteered read also keeps the prompts' states a question lean may read (when one is considered).
    unsteered_read = read_answers(lm, items, state_layers=lean_blocks(lm) if len(items) >= MIN_LEAN_SAMPLE else [],
                                  orders=orders)
    unsteered = unsteered_read.distributions
    done = 2
    # Out-of-fold answer distributions of every candidate (setting, layer, index into its strength grid):
    # oof_by_order[key][o][i] in order o alone (o = 0: the item's own, 1: reversed, mapped back), oof the mean.
    oof_by_order: dict[tuple[int, int, int], list[list[Any]]] = {
        (v, L, j): [[None] * len(items) for _ in range(orders)] for (v, L), grid in grids.items()
        for j in range(len(grid))}
    for f, fold in enumerate(folds):
        held = set(fold)
        report(done, total, f"fold {f + 1}/{len(folds)}: fit")
        fitted = fit_settings(spec, lm, in_orders([it for i, it in enumerate(items) if i not in held], orders),
                              layers, settings, positions)
        done += 1
        judged = [items[i] for i in fold]
        asked = in_both_orders(judged) if orders == 2 else judged  # both orders in the same batches
        for L in layers:
            # Every (setting, strength) of the layer in one call, which runs what they share once.
            steerings: list[Any] = []
            keys: list[tuple[int, int, int]] = []
            for v in range(len(settings)):
                fold_grid = [float(strength)] if strength is not None else spec.strengths(fitted[v][L], lm)
                for j, s in enumerate(fold_grid):
                    fitted[v][L].strength = s
                    steerings.append([spec.intervention(fitted[v][L], lm)] if s != 0 else None)
                    keys.append((v, L, j))
            for key, dists in zip(keys, answer_distributions_under(lm, asked, steerings, orders=1), strict=True):
                for o, reads in enumerate(split_orders(dists, len(judged)) if orders == 2 else [dists]):
                    for i, d in zip(fold, reads, strict=True):
                        oof_by_order[key][o][i] = d
            done += 1
            report(done, total, f"fold {f + 1}/{len(folds)}: searched layer {L}")
    oof = {key: average_orders(reads) for key, reads in oof_by_order.items()}
    # What chat would get from each candidate: its steering alone, read one order at a time, over unsteered.
    # A candidate that makes that worse (a letter bias that a calibrated, order-averaged read hides) cannot ship.
    for_chat = {key: generation_gain(items, reads, unsteered_read.by_order)["gain_vs_unsteered"]["mean"]
                for key, reads in oof_by_order.items()}
    chosen = select_setting(items, unsteered, oof, folds, eligible={key for key, g in for_chat.items() if g >= 0})
    score_name = "specificity" if chosen.by_specificity else SELECTION_METRIC
    search = [{"layer": L, "strength": grids[(v, L)][j], **{k: settings[v][k] for k in varied},
               score_name: chosen.search[(v, L, j)],
               "uncalibrated_alignment": float(sample_alignment(items, oof[(v, L, j)]).mean()),
               "generation_gain": for_chat[(v, L, j)]} for v, L, j in oof]
    assert chosen.best is not None
    best_setting, best_layer, best_index = chosen.best
    improved = chosen.improved
    best_after = mean_metrics(chosen.best_items)
    baselines = {name: mean_metrics(per_item) for name, per_item in chosen.baselines.items()}
    profile = full[best_setting][best_layer]
    profile.strength = grids[(best_setting, best_layer)][best_index] if improved else 0.0
    profile.calibration = chosen.calibration
    # A question lean reads states that the shipped steering does not move: blocks below its own.
    lean_states = {L: x for L, x in unsteered_read.states.items() if not improved or L < best_layer}
    shipped_readings = oof[chosen.best] if improved else unsteered
    profile.question_lean, lean_record, shipped_items, shipped_answers = choose_question_lean(
        items, shipped_readings, lean_states, chosen, folds)
    profile.sample_hash = sample_hash(items)
    best_alignment = chosen.best_items[SELECTION_METRIC]
    calibrated_alignment = chosen.baselines["calibrated"][SELECTION_METRIC]
    unsteered_alignment = chosen.baselines["unsteered"][SELECTION_METRIC]
    shipped_alignment = shipped_items[SELECTION_METRIC]
    serves: Serves = "steering" if improved else (
        "unsteered model" if profile.calibration.is_identity and profile.question_lean is None else "calibrated model")
    verdict = judge(shipped_alignment, calibrated_alignment, chosen.baselines["uniform"][SELECTION_METRIC],
                    shipped_answers, serves)
    # What chat gets: the shipped steering alone, one option order at a time (none shipped: exactly unsteered).
    steered_by_order = oof_by_order[chosen.best] if improved else unsteered_read.by_order
    generation = {"steering": improved, **generation_gain(items, steered_by_order, unsteered_read.by_order,
                                                          contrast_items(items)),
                  "note": "the steering alone, uncalibrated, read one option order at a time as a chat prompt is; "
                          "the calibration and question lean act on option distributions only" if improved else
                          "no steering ships: chat gets the unsteered model"}
    profile.metrics = {
        "evaluation": "cross-validated", "folds": len(folds), "items": len(items), "orders": orders,
        "selection": ("out-of-fold specificity over the calibrated unsteered model (gain in alignment with the "
                      "group minus gain in alignment with its contrast; own gain >= 0)" if chosen.by_specificity
                      else "out-of-fold alignment over the calibrated unsteered model"),
        **baselines,
        "steered": mean_metrics(shipped_items),
        "best_candidate": best_after,
        "gain": _gain(best_alignment, unsteered_alignment),
        "gain_vs_calibrated": _gain(best_alignment, calibrated_alignment),
        "shipped_gain": {"vs_unsteered": _gain(shipped_alignment, unsteered_alignment),
                         "vs_calibrated": _gain(shipped_alignment, calibrated_alignment),
                         "vs_uniform": _gain(shipped_alignment, chosen.baselines["uniform"][SELECTION_METRIC])},
        "calibration": {**chosen.calibration.to_json(), "lean_fitted": chosen.lean},
        "question_lean": lean_record,
        "steering_shipped": improved,
        "improved": verdict.improved,
        "verdict": verdict.to_json(),
        "generation": generation,
        "choice": {"layer": best_layer, "strength": profile.strength, **{k: settings[best_setting][k] for k in varied},
                   "metric": score_name},
        "search": search,
        "note": None if improved else (
            "no setting told the group apart from its contrast better than the calibrated unsteered model on "
            "held-out items without a loss to the group" if chosen.by_specificity else
            "no setting beat the calibrated unsteered model on held-out items")
            + " without making what chat gets (the steering alone, one option order at a time) worse than unsteered"
            + "; strength set to 0 (the profile applies its calibration only)",
        "per_item": per_item_record(items, unsteered_alignment, calibrated_alignment,
                                    shipped_items[SELECTION_METRIC]),
    }
    report(total, total, "done")
    return profile

