"""How much of the way two groups differ could a profile built on 20 of their answers carry at all?

    .venv/bin/python bench/group_signal.py [--data DIR] [--pairs POLIDEOLOGY:Liberal:Conservative ...]
        [--train 20 50 100 300] [--splits 30] [--lean-train 20 300] [--seeds 0 1 2] [--encoder DIR]
        [--lean-min-items N] [--skip-personas] [--threads N]

Issue 13 asks for profiles whose answers differ the way the groups differ (steerability contrast r >= 0.3
over unseen questions). A profile can get that from two places, and this bench measures both on the
questions both groups of each OpinionsQA attribute pair answered:

- what the model already knows: the unsteered model asked to answer "as <a member of the group> would" (a
  persona line before the question, no learning). Printed: r over questions between the two personas'
  difference in expected ordinal answer and the groups' difference, in both option orders;
- what can be learned from the items: a ridge probe from the model's reading of a question (the hidden state
  after each block, at the last prompt position and averaged over the prompt, both option orders averaged)
  to the groups' difference in expected ordinal answer (and one probe on the probed blocks' last-position
  states side by side: several layers at once), trained on `--train` random questions and judged on
  all the others. A steering profile's effect on an answer is a function of the same hidden states, fitted
  on the same N items; a regularized linear probe is about the best such few-shot learner, so when it
  cannot predict the difference out of sample, a profile fitted on N items is not expected to (evidence,
  not a proof). Printed: held-out r by training size, the layer chosen on the training questions alone (ridge
  leave-one-out error) and, as an optimistic ceiling, the best layer on the judge questions; mean and
  standard deviation over `--splits` random splits. The groups' mean answer (what every group shares, on
  each question's scale mapped to [-1, 1]) is probed beside it for scale.

What a profile that reads the question carries (`--lean-train 20 300`, `--seeds 0 1 2`): the question lean
of `steer_core.question_lean` as `build_profile` makes it when no steering beats calibration (the typical
build), for each group on its build questions (survey order): the calibration chosen out of fold, each
build question's own best lean at its temperature, a ridge probe from the prompt's mean hidden state (one
of `build.lean_blocks`) to that lean. "As built" ships it only where it beats the calibration out of fold
and the build has `--lean-min-items` items (default `build.MIN_LEAN_SAMPLE`; 0 shows what the choice does
on smaller builds); "always" fits it regardless, to tell the lean from the choice. Each judge question is
read as a served profile reads it, in each option order from its own prompt. Judged with
`steer_core.evaluation` like every profile (`calibrated` is each group's own plain calibration): gains
over calibrated (both orders and each order), unsteered and uniform, specificity, steerability contrast r
by order, and how often it shipped.

`--encoder DIR` adds the same probe on a sentence encoder's mean-pooled embedding of the question and its
options (any transformers encoder directory, e.g. all-MiniLM-L6-v2): is the limit the 135M model's reading
or the number of items?
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import RidgeCV

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quality_opinionsqa import bar, group_items, pooled  # noqa: E402

from steer_core import load_model  # noqa: E402
from steer_core.build import MIN_LEAN_SAMPLE, choose_question_lean, lean_blocks, select_setting  # noqa: E402
from steer_core.calibration import Calibration, ordinal_z  # noqa: E402
from steer_core.data import OpinionItem, make_item, reverse_options  # noqa: E402
from steer_core.evaluation import (  # noqa: E402
    BOTH,
    ORDERS,
    ORIGINAL,
    evaluate_readings,
    expected_ordinal,
    read_orders,
)
from steer_core.folds import fold_indices  # noqa: E402
from steer_core.models import LanguageModel  # noqa: E402
from steer_core.prompts import AnswerRead, by_length, encode_items, last_logits_only, read_answers  # noqa: E402
from steer_core.question_lean import PENALTIES, QuestionLean, fit_for_sample  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "opinionsqa"
DEFAULT_PAIRS = ["POLIDEOLOGY:Liberal:Conservative", "RACE:Black:White", "AGE:18-29:65+"]
PERSONAS = {"Liberal": "a political liberal", "Conservative": "a political conservative",
            "Black": "a Black American", "White": "a White American",
            "18-29": "an American aged 18 to 29", "65+": "an American aged 65 or older"}
MIN_CONTRAST_R = 0.3  # issue 13's steerability-contrast bar
BUILD_ITEMS = 20  # issue 13's build size


def persona_items(items: list[OpinionItem], attribute: str, group: str) -> list[OpinionItem]:
    who = PERSONAS.get(group, f"a person whose {attribute.lower()} is {group}")
    return [make_item(f"Answer as {who} would.\n{it.question}", it.options, target=it.target,
                      ordinal=it.ordinal, id=it.id) for it in items]


def expected(items: list[OpinionItem], dists: list[np.ndarray] | None = None) -> np.ndarray:
    """Expected ordinal answer per question under `dists` (the items' targets when None)."""
    answers = dists if dists is not None else [it.target for it in items]
    return np.array([expected_ordinal(p, it.ordinal) for it, p in zip(items, answers, strict=True)])


def scaled_answer(items: list[OpinionItem]) -> np.ndarray:
    """The targets' expected answer on each question's own ordinal scale mapped to [-1, 1], so that a
    question's number of options is no signal."""
    return np.array([np.dot(it.target, ordinal_z(it.ordinal)) for it in items])


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else 0.0


@torch.no_grad()
def question_states(lm: LanguageModel, items: list[OpinionItem], batch_size: int = 16) -> dict[str, np.ndarray]:
    """(questions, blocks, hidden) states after each block: at the last prompt position and averaged over the
    prompt's tokens, each the mean of the two option orders."""
    out = {kind: np.zeros((len(items), lm.num_layers, lm.hidden_size)) for kind in ("last", "mean")}
    for order in ORDERS:
        asked = items if order == ORDERS[0] else [reverse_options(it) for it in items]
        index = by_length(lm, asked)
        for start in range(0, len(index), batch_size):
            rows = index[start:start + batch_size]
            batch = encode_items(lm, [asked[i] for i in rows])
            hidden = lm.model(**batch, output_hidden_states=True, use_cache=False,
                              **last_logits_only(lm)).hidden_states[1:]
            states = torch.stack(hidden, dim=1).float()  # (B, blocks, T, H)
            mask = batch["attention_mask"].float()[:, None, :, None]
            out["last"][rows] += states[:, :, -1].cpu().numpy() / len(ORDERS)
            out["mean"][rows] += ((states * mask).sum(2) / mask.sum(2)).cpu().numpy() / len(ORDERS)
    return out


@torch.no_grad()
def encoder_embeddings(path: Path, items: list[OpinionItem]) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = [f"{it.question} {' / '.join(it.options)}" for it in items]
    out = []
    for start in range(0, len(texts), 32):
        batch = tokenizer(texts[start:start + 32], padding=True, truncation=True, return_tensors="pt")
        mask = batch["attention_mask"][..., None].float()
        out.append(((model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(out)


def layer_probes(features: np.ndarray, y: np.ndarray, fit: np.ndarray) -> list[tuple[float, Any]]:
    """Per layer, a ridge probe (standardized features, penalty by leave-one-out error) fitted on the `fit`
    rows: its leave-one-out score and a function predicting `y` for any rows. `features`: (rows, layers, dim)."""
    probes = []
    for layer in range(features.shape[1]):
        x = features[:, layer]
        mu, sd = x[fit].mean(0), x[fit].std(0) + 1e-6
        model = RidgeCV(alphas=PENALTIES).fit((x[fit] - mu) / sd, y[fit])
        probes.append((model.best_score_, lambda rows, x=x, mu=mu, sd=sd, model=model:
                       model.predict((x[rows] - mu) / sd)))
    return probes


def fit_probe(features: np.ndarray, y: np.ndarray, fit: np.ndarray) -> Any:
    """The probe of the layer with the best leave-one-out score on the `fit` rows."""
    return max(layer_probes(features, y, fit), key=lambda probe: probe[0])[1]


def probe_r(features: np.ndarray, y: np.ndarray, train: int, splits: int, seed: int) -> dict[str, np.ndarray]:
    """Held-out r of the layers' probes to `y`, per random split: the layer chosen on the training questions
    (`fit_probe`: "chosen") and the best on the judge questions ("ceiling")."""
    rng = np.random.default_rng(seed)
    chosen, ceiling = [], []
    for _ in range(splits):
        order = rng.permutation(len(y))
        fit, judge = order[:train], order[train:]
        probes = layer_probes(features, y, fit)
        rs = [correlation(predict(judge), y[judge]) for _, predict in probes]
        chosen.append(rs[int(np.argmax([score for score, _ in probes]))])
        ceiling.append(max(rs))
    return {"chosen": np.array(chosen), "ceiling": np.array(ceiling)}


def read_both(lm: LanguageModel, items: list[OpinionItem], layers: list[int]) -> dict[str, AnswerRead]:
    """Each option order's read of `items` (distributions mapped back to survey order) with the prompts' states
    after `layers`, as a served profile reads them: each order from its own prompt."""
    out = {}
    for order in ORDERS:
        asked = items if order == ORIGINAL else [reverse_options(it) for it in items]
        read = read_answers(lm, asked, state_layers=layers)
        if order != ORIGINAL:
            read.distributions = [p[::-1].copy() for p in read.distributions]
        out[order] = read
    return out


def built_lean(items: list[OpinionItem], reads: dict[str, AnswerRead], build: np.ndarray, seed: int,
               min_items: int) -> tuple[Calibration, QuestionLean | None, QuestionLean]:
    """What `build_profile` ships for a group when no steering beats calibration, built on the `build`
    questions in survey order: the calibration, and the question lean when it beats it out of fold (else
    None); and the question lean fitted regardless (to tell the lean from the choice)."""
    sample = [items[i] for i in build]
    readings = [reads[ORIGINAL].distributions[i] for i in build]
    states = {layer: x[build] for layer, x in reads[ORIGINAL].states.items()}
    folds = fold_indices(len(sample), seed=seed)
    chosen = select_setting(sample, readings, {}, folds)
    lean, _, _ = choose_question_lean(sample, readings, states, chosen, folds, min_items)
    return chosen.calibration, lean, fit_for_sample(sample, readings, states, chosen.calibration.temperature)


def leaned(items: list[OpinionItem], reads: dict[str, AnswerRead], judge: np.ndarray, calibration: Calibration,
           lean: QuestionLean | None) -> dict[str, list[np.ndarray]]:
    """The `judge` questions' distributions in each order under `calibration`, its lean read off each
    question's prompt when `lean` is given."""
    out = {}
    for order, read in reads.items():
        calibrations = ([calibration] * len(judge) if lean is None else
                        lean.calibrations(calibration.temperature, read.states[lean.layer][judge]))
        out[order] = [c.apply(read.distributions[i], items[i].ordinal)
                      for c, i in zip(calibrations, judge, strict=True)]
    return out


def print_probes(features: dict[str, np.ndarray], targets: dict[str, np.ndarray], sizes: list[int],
                 splits: int) -> None:
    print(f"{'target':12s} {'features':24s} {'layer':8s}" + "".join(f"{f'n={n}':>15s}" for n in sizes))
    at_build = []
    for target, y in targets.items():
        for name, x in features.items():
            results = {n: probe_r(x, y, n, splits, seed=n) for n in sizes if n < len(y) - 10}
            for pick in ("chosen", "ceiling") if x.shape[1] > 1 else ("chosen",):
                cells = "".join(f"{f'{r[pick].mean():+.3f} ± {r[pick].std(ddof=1):.3f}':>15s}"
                                for r in results.values())
                print(f"{target:12s} {name:24s} {pick:8s}{cells}")
            if target == "difference" and BUILD_ITEMS in results:
                at_build.append(results[BUILD_ITEMS]["ceiling" if x.shape[1] > 1 else "chosen"].mean())
    if at_build:
        best = max(at_build)
        print(bar(best >= MIN_CONTRAST_R, f"best probe of the groups' difference from {BUILD_ITEMS} items "
                  f"(optimistic: layer picked on the judge questions): r = {best:+.3f}; the contrast bar is r >= "
                  f"{MIN_CONTRAST_R}"))


def print_conditional_lean(groups: dict[str, list[OpinionItem]], reads: dict[str, AnswerRead], size: int,
                           seeds: list[int], min_items: int) -> None:
    """Each group's question lean built on `size` random questions per seed and judged on the others: as the
    build ships it ("as built": only where it beats the plain calibration out of fold) and fitted regardless."""
    names = list(groups)
    variants = ("as built", "always")
    # (option order, baseline) -> per variant and group, one (gain, SE) per seed
    columns = [(BOTH, "calibrated"), (BOTH, "unsteered"), (BOTH, "uniform"), *((o, "calibrated") for o in ORDERS)]
    gains = {(v, g): {c: [] for c in columns} for v in variants for g in names}
    spec: dict[tuple[str, str], list[tuple[float, float]]] = {(v, g): [] for v in variants for g in names}
    r: dict[str, dict[str, list[float]]] = {v: {order: [] for order in ORDERS} for v in variants}
    shipped = {g: 0 for g in names}
    for seed in seeds:
        shuffled = np.random.default_rng(seed).permutation(len(groups[names[0]]))
        build, judge = shuffled[:size], shuffled[size:]
        made = {g: built_lean(groups[g], reads, build, seed, min_items) for g in names}
        profiles = {}
        for g, (calibration, lean, forced) in made.items():
            shipped[g] += lean is not None
            profiles[f"as built@{g}"] = leaned(groups[g], reads, judge, calibration, lean)
            profiles[f"always@{g}"] = leaned(groups[g], reads, judge, calibration, forced)
        report = evaluate_readings({g: [groups[g][i] for i in judge] for g in names},
                                   {o: [reads[o].distributions[i] for i in judge] for o in ORDERS}, profiles,
                                   own={f"{v}@{g}": g for v in variants for g in names},
                                   calibrations={g: made[g][0] for g in names})
        for v in variants:
            for g in names:
                for order, baseline in columns:
                    gain = report["cells"][order][f"{v}@{g}"][g][f"gain_vs_{baseline}"]
                    gains[(v, g)][(order, baseline)].append((gain["mean"], gain["standard_error"]))
                own = report["specificity"][BOTH][f"{v}@{g}"]
                spec[(v, g)].append((own["mean"], own["standard_error"]))
            pair = [f"{v}@{g}" for g in names]
            contrast = next(c for c in report["steerability_contrast"] if c["profiles"] == pair)
            for o in ORDERS:
                r[v][o].append(contrast["r"][o])
    print(f"  build {size}, judge {len(groups[names[0]]) - size}; the build shipped the lean for "
          + ", ".join(f"{g} {shipped[g]}/{len(seeds)}" for g in names))
    for v in variants:
        # r is undefined (nan) where the two groups' profiles read every question alike; left out of the mean.
        undefined = int(np.isnan(r[v][ORDERS[0]]).sum())
        contrast_r = float(np.nanmean([np.nanmean(r[v][o]) for o in ORDERS]))
        print(f"   {v}: contrast r {contrast_r:+.3f} ({np.nanmean(r[v][ORDERS[0]]):+.3f} / "
              f"{np.nanmean(r[v][ORDERS[1]]):+.3f} by order{f'; undefined in {undefined} seeds' if undefined else ''})"
              "  " + bar(contrast_r >= MIN_CONTRAST_R, f"contrast r >= {MIN_CONTRAST_R}"))
        for g in names:
            estimates = {column: pooled(values) for column, values in gains[(v, g)].items()}
            text = ", ".join(f"vs {baseline}{'' if order == BOTH else f' ({order} order)'} {m:+.4f} ± {se:.4f}"
                             for (order, baseline), (m, se) in estimates.items())
            specific = pooled(spec[(v, g)])
            over_calibrated = estimates[(BOTH, "calibrated")]
            print(f"    {g:14s} gain {text}; specificity {specific[0]:+.4f} ± {specific[1]:.4f}  "
                  + bar(over_calibrated[0] > over_calibrated[1], "above calibrated by one SE"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS, help="ATTRIBUTE:GROUP:GROUP")
    parser.add_argument("--train", nargs="*", type=int, default=[20, 50, 100, 300],
                        help="training sizes for the probes (none: skip them)")
    parser.add_argument("--splits", type=int, default=30)
    parser.add_argument("--lean-train", nargs="*", type=int, default=[20, 300],
                        help="build sizes for the question-conditional lean (none: skip it)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="splits for the conditional lean")
    parser.add_argument("--layer-step", type=int, default=3, help="probe every k-th block (and the last)")
    parser.add_argument("--encoder", type=Path, help="a transformers sentence-encoder directory to probe beside")
    parser.add_argument("--lean-min-items", type=int, default=MIN_LEAN_SAMPLE,
                        help="the smallest build a question lean is considered for (0: every size)")
    parser.add_argument("--skip-personas", action="store_true", help="leave out the persona prompts")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"no OpinionsQA data at {args.data}; nothing to measure")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model()
    layers = sorted({*range(args.layer_step - 1, lm.num_layers, args.layer_step), lm.num_layers - 1})
    for pair in args.pairs:
        attribute, g1, g2 = pair.split(":")
        t0 = time.time()
        groups = group_items(args.data, attribute, [g1, g2])
        a, b = groups[g1], groups[g2]
        difference = expected(a) - expected(b)
        shared = (scaled_answer(a) + scaled_answer(b)) / 2
        print(f"\n== {attribute}: {g1} vs {g2}, {len(a)} questions (sd of the groups' difference in expected "
              f"answer {difference.std():.3f})")

        if not args.skip_personas:  # what the model already knows: persona prompts, no learning
            reads = {g: read_orders(lm, persona_items(a, attribute, g)) for g in (g1, g2)}
            answered = {g: {order: expected(a, reads[g][order]) for order in ORDERS} for g in (g1, g2)}
            for g in (g1, g2):
                answered[g][BOTH] = np.mean([answered[g][order] for order in ORDERS], axis=0)
            for order in (*ORDERS, BOTH):
                r = correlation(answered[g1][order] - answered[g2][order], difference)
                print(f"persona prompts ({PERSONAS.get(g1, g1)} / {PERSONAS.get(g2, g2)}), {order}: r = {r:+.3f}")

        if args.train:
            states = question_states(lm, a)
            features = {"model, last position": states["last"][:, layers],
                        "model, mean over prompt": states["mean"][:, layers],
                        # several layers at once: one probe on the probed blocks' states side by side
                        "model, blocks together": states["last"][:, layers].reshape(len(a), 1, -1)}
            if args.encoder:
                features["sentence encoder"] = encoder_embeddings(args.encoder, a)[:, None, :]
            print(f"probes (held-out r, mean ± sd over {args.splits} splits; model blocks {layers}):")
            print_probes(features, {"difference": difference, "mean, scaled": shared}, args.train, args.splits)
        if args.lean_train:
            print(f"question lean (judged in both orders; mean over seeds {args.seeds}):")
            reads = read_both(lm, a, lean_blocks(lm))
            for n in args.lean_train:
                print_conditional_lean(groups, reads, n, args.seeds, args.lean_min_items)
        print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
