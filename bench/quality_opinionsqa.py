"""Group-specific steering on OpinionsQA, judged so that flattening and letter position cannot pass.

    .venv/bin/python bench/quality_opinionsqa.py [--data DIR] [--pairs POLIDEOLOGY:Liberal:Conservative ...]
        [--seeds 0 1 2] [--train 20] [--judge N] [--methods diffmean diffmean+contrast+orders ...]
        [--persons K] [--person-method diffmean+orders] [--personas NAME ...] [--persona-method odesteer]
        [--threads N]

For each attribute pair and seed the questions both groups answered are shuffled; `--train` of them
build (every profile's own cross-validated search), the others judge (`--judge` caps how many, default
all of them). A method is a registered method with options: `+contrast` builds on items that carry the
other group's answers to the same questions (DiffMean weighs options by group minus other; COLD methods
and LoRA take loss `contrast`), `+orders` fits on every item also with its options reversed, `+last`
steers only the last prompt position (where the answer letter is read) instead of the method's default
positions. Every number comes from `steer_core.evaluation` on the judge questions, in both option orders,
beside `unsteered`, `uniform` and `calibrated` (the unsteered model with a temperature and ordinal lean
fitted on each group's own build questions), with paired standard errors over questions.

`--persons K` simulates K people per group and seed: a person answers each build question with one
draw from the group's distribution; a profile built on those one-hot answers, the group's profile and
their 50/50 blend (with the blend's calibration, as the service applies it) are judged against the
person's group on the judge questions beside `uniform` and `calibrated` on the person's own answers the
way their build calibrates (the temperature, and the lean only where it helps out of fold).

`--personas NAME ...` (files of ../shared/data/persona, e.g. politically-liberal) builds `--persona-method`
(default odesteer) on `--train` statements of each persona per seed and judges it on `--persona-judge` others
of the same persona, in both orders, against `unsteered`, `uniform` and `calibrated` (fitted on the build
statements).
`--pairs` with no pair runs the persona part alone.

The targets (issue 13) are printed as pass/fail bars; a bar that fails stays a bar.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from steer_core import METHODS, build_profile, load_model  # noqa: E402
from steer_core.calibration import (  # noqa: E402
    blend_calibration,
    choose_calibration,
    fit_calibration,
    sample_alignment,
)
from steer_core.data import load_opinionsqa, load_persona, make_item, with_contrast  # noqa: E402
from steer_core.evaluation import (  # noqa: E402
    BOTH,
    ORDERS,
    evaluate,
    format_cross_table,
    paired_difference,
    uniform_distributions,
)
from steer_core.evaluation import read_orders as read_profile  # noqa: E402
from steer_core.folds import fold_indices  # noqa: E402
from steer_core.methods import intervention  # noqa: E402
from steer_core.prompts import answer_distributions  # noqa: E402
from steer_core.steering import compose  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "opinionsqa"
DEFAULT_PAIRS = ["POLIDEOLOGY:Liberal:Conservative", "RACE:Black:White", "AGE:18-29:65+"]
DEFAULT_METHODS = ["diffmean", "diffmean+contrast+orders", "cold_kernel", "cold_kernel+contrast+orders"]
OPTIONS = ("contrast", "orders", "last")
LOSS_METHODS = ("cold_kernel", "cold_fd", "lora")  # methods trained with a loss from `steer_core.losses`
# The summary's gain columns: (option order, the report cell's field). By order, a profile that learned letter
# positions gains in one order and loses in the other.
GAIN_COLUMNS = {"calibrated": (BOTH, "gain_vs_calibrated"), "unsteered": (BOTH, "gain_vs_unsteered"),
                "uniform": (BOTH, "gain_vs_uniform"),
                **{f"calibrated, {o}": (o, "gain_vs_calibrated") for o in ORDERS}}


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    contrast: bool
    params: dict[str, Any]


def parse_variant(text: str) -> Variant:
    method, *options = text.split("+")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; registered: {sorted(METHODS)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} in {text!r}; options: {', '.join(OPTIONS)}")
    params: dict[str, Any] = {}
    if "orders" in options:
        params["orders"] = 2
    if "last" in options:
        params["positions"] = "last"
    if "contrast" in options and method in LOSS_METHODS:
        params["loss"] = "contrast"
    if "contrast" in options and method not in (*LOSS_METHODS, "diffmean"):
        raise ValueError(f"{method} has no group-relative objective")
    return Variant(text, method, "contrast" in options, params)


def group_items(data: Path, attribute: str, groups: list[str]) -> dict[str, list]:
    """Each group's items over every wave, aligned by question id (same questions, same order)."""
    waves = sorted(data.glob("American_Trends_Panel_W*"))
    by_group = {g: {it.id: it for wave in waves for it in load_opinionsqa(wave, attribute, g)} for g in groups}
    shared = sorted(set.intersection(*(set(d) for d in by_group.values())))
    return {g: [by_group[g][key] for key in shared] for g in groups}


def pooled(estimates: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean of independent estimates (seeds) and its standard error."""
    means = [m for m, _ in estimates]
    return float(np.mean(means)), math.sqrt(sum(se * se for _, se in estimates)) / len(estimates)


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over values (groups x seeds)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan


def bar(passed: bool, text: str) -> str:
    return f"[{'PASS' if passed else 'FAIL'}] {text}"


def person_items(items: list, rng: random.Random) -> list:
    """One simulated person of the group: one draw from the group's distribution per question."""
    return [make_item(it.question, it.options, answer=rng.choices(range(len(it.options)), it.target)[0],
                      ordinal=it.ordinal, id=it.id) for it in items]


def read_blend(lm, questions: list, profiles: list) -> dict[str, list[np.ndarray]]:  # noqa: ANN001
    """Answer distributions under an equal-weight blend of `profiles`, in both orders (survey order), with the
    blend's calibration applied as the service applies it (`blend_calibration` of the parts' own)."""
    from steer_core.evaluation import reverse_options

    live = [p for p in profiles if p.strength != 0]
    row = compose([(intervention(p, lm), 1.0 / len(profiles)) for p in live]) if live else None
    calibration = blend_calibration([(p.calibration, 1.0 / len(profiles)) for p in profiles])
    out = {}
    for order in ORDERS:
        asked = questions if order == ORDERS[0] else [reverse_options(it) for it in questions]
        dists = answer_distributions(lm, asked, row)
        out[order] = calibration.apply_all(questions, dists if order == ORDERS[0] else [p[::-1].copy() for p in dists])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--pairs", nargs="*", default=DEFAULT_PAIRS, help="ATTRIBUTE:GroupA:GroupB")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=20)
    parser.add_argument("--judge", type=int, default=0, help="judge questions per seed (0: all the others)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--persons", type=int, default=0, help="simulated people per group and seed")
    parser.add_argument("--person-method", default="diffmean+orders")
    parser.add_argument("--personas", nargs="*", default=[], help="persona statement sets (file names)")
    parser.add_argument("--persona-method", default="odesteer")
    parser.add_argument("--persona-judge", type=int, default=100, help="judge statements per persona and seed")
    parser.add_argument("--persona-data", type=Path, default=DEFAULT_DATA.parent / "persona")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"skipped: {args.data} is not present (OpinionsQA data is not shipped with the repo)")
        return 0
    try:
        variants = [parse_variant(m) for m in args.methods]
        person_variant = parse_variant(args.person_method)
        persona_variant = parse_variant(args.persona_method)
        pairs = [tuple(p.split(":")) for p in args.pairs]
        if any(len(p) != 3 for p in pairs):
            raise ValueError("each pair is ATTRIBUTE:GroupA:GroupB")
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    lm = load_model()
    print(f"model {lm.name}; pairs {args.pairs}; seeds {args.seeds}; {args.train} questions build, "
          f"{args.judge or 'all other'} judge; methods {args.methods}")

    # gains[variant][column][(pair, seed, group)] = (mean, se), the columns of `GAIN_COLUMNS`
    gains: dict[str, dict[str, dict[tuple, tuple[float, float]]]] = {
        v.name: {column: {} for column in GAIN_COLUMNS} for v in variants}
    spec: dict[str, dict[tuple, float]] = {v.name: {} for v in variants}
    contrast_r: dict[str, list[list[float]]] = {v.name: [] for v in variants}  # each order's r
    person_rows: list[dict[str, tuple[float, float]]] = []
    for attribute, ga, gb in pairs:
        data = group_items(args.data, attribute, [ga, gb])
        n = len(data[ga])
        for seed in args.seeds:
            order = list(range(n))
            random.Random(seed).shuffle(order)
            judge_count = args.judge or n - args.train
            if args.train + judge_count > n:
                parser.error(f"only {n} shared questions for {attribute} {ga}/{gb}")
            train_idx, judge_idx = order[:args.train], order[args.train:args.train + judge_count]
            train = {g: [data[g][i] for i in train_idx] for g in (ga, gb)}
            judge = {g: [data[g][i] for i in judge_idx] for g in (ga, gb)}
            unsteered_train = answer_distributions(lm, train[ga])
            calibrations = {g: fit_calibration(train[g], unsteered_train) for g in (ga, gb)}
            profiles, own = {}, {}
            for v in variants:
                for g, other in ((ga, gb), (gb, ga)):
                    items = with_contrast(train[g], [train[other]]) if v.contrast else train[g]
                    start = time.perf_counter()
                    p = build_profile(lm, items, v.method, v.params, seed=seed)
                    profiles[f"{v.name}@{g}"], own[f"{v.name}@{g}"] = p, g
                    lean = "" if p.question_lean is None else f", question lean at block {p.question_lean.layer}"
                    print(f"  {attribute} seed {seed} {g:<13} {v.name:<28} layer {p.layer:>2} strength "
                          f"{p.strength:<6g} out-of-fold gain {p.metrics['gain']['alignment']:+.4f} +- "
                          f"{p.metrics['gain']['standard_error']:.4f}{lean}; build "
                          f"{time.perf_counter() - start:.0f} s", flush=True)
            report = evaluate(lm, judge, profiles, own, calibrations, seed=seed)
            print(f"\n{attribute} {ga} vs {gb}, seed {seed}\n{format_cross_table(report, BOTH)}\n", flush=True)
            for v in variants:
                for g in (ga, gb):
                    key = (attribute, seed, g)
                    for column, (o, field) in GAIN_COLUMNS.items():
                        e = report["cells"][o][f"{v.name}@{g}"][g][field]
                        gains[v.name][column][key] = (e["mean"], e["standard_error"])
                    spec[v.name][key] = report["specificity"][BOTH][f"{v.name}@{g}"]["mean"]
                for c in report["steerability_contrast"]:
                    if c["profiles"][0].split("@")[0] == v.name == c["profiles"][1].split("@")[0]:
                        contrast_r[v.name].append([float(c["r"][o]) for o in ORDERS])
            if args.persons:
                person_rows += judge_people(lm, args, person_variant, seed, train, judge, profiles, variants)

    persona_rows = judge_personas(lm, args, persona_variant) if args.personas else []
    if pairs:
        summarize(variants, gains, spec, contrast_r)
    if persona_rows:
        print(f"\n{persona_variant.name} on persona statements ({len(persona_rows)} persona x seed; both orders):")
        for r in persona_rows:
            print(f"  {r['name']:<32} seed {r['seed']}: gain vs calibrated {r['cal'][0]:+.4f} ± {r['cal'][1]:.4f}, "
                  f"vs unsteered {r['unst'][0]:+.4f} ± {r['unst'][1]:.4f}; uniform vs calibrated "
                  f"{r['uniform'][0]:+.4f} ± {r['uniform'][1]:.4f}")
        m, se = pooled([r["uniform"] for r in persona_rows])
        print(f"  uniform over calibrated on the same statements: {m:+.4f} ± {se:.4f} (mean over personas and seeds)")
        m, se = pooled([r["cal"] for r in persona_rows])
        print(bar(m > se, f"{persona_variant.name} above calibrated on persona items by more than one paired SE: "
                          f"{m:+.4f} ± {se:.4f} (mean over personas and seeds)"))
        worst = min(persona_rows, key=lambda r: r["unst"][0] + r["unst"][1])
        print(bar(all(r["unst"][0] > -r["unst"][1] for r in persona_rows),
                  f"{persona_variant.name} never loses more than one SE against unsteered on persona items (worst "
                  f"{worst['name']} seed {worst['seed']}: {worst['unst'][0]:+.4f} ± {worst['unst'][1]:.4f})"))
    else:
        print("[----] ODESteer above calibrated on persona items: not measured in this run (--personas)")
    if person_rows:
        print(f"\nsimulated people ({len(person_rows)}; profile {args.person_method}), alignment with the "
              "person's group on judge questions, gain vs calibrated on the person's own answers:")
        for row in ("person", "group", "blend", "uniform", "unsteered"):
            m, se = pooled([r[row] for r in person_rows])
            print(f"  {row:<8}{m:+.4f} ± {se:.4f}")
        m, se = pooled([r["person"] for r in person_rows])
        print(bar(m > se, f"one-person profiles above calibrated for the person's group: {m:+.4f} ± {se:.4f}"))
        m, se = pooled([r["blend_vs_person"] for r in person_rows])
        m2, se2 = pooled([r["blend_vs_group"] for r in person_rows])
        print(f"  blend - person {m:+.4f} ± {se:.4f}; blend - group {m2:+.4f} ± {se2:.4f}")
        m, se = pooled([r["own_vs_other"] for r in person_rows])
        print(f"  {args.train} answers tell the person's group from the other: person profile's gain for own group "
              f"minus for the other {m:+.4f} ± {se:.4f}")
    return 0


def summarize(variants: list[Variant], gains: dict, spec: dict, contrast_r: dict) -> None:
    """The summary table over pairs and seeds and issue 13's bars for the group profiles."""
    print("\nsummary over pairs and seeds (judge questions, both option orders)")
    print(f"{'method':<30}{'gain vs calibrated':>22}{'gain vs unsteered':>22}{'gain vs uniform':>22}"
          f"{'vs calibrated, original / reversed order':>44}{'specificity':>20}{'contrast r':>12}{'r by order':>16}")
    summary = {}
    for v in variants:
        gc, gu, gf, go, gr = (pooled(list(gains[v.name][column].values())) for column in GAIN_COLUMNS)
        sp = spread(list(spec[v.name].values()))
        by_order = np.nanmean(contrast_r[v.name], axis=0) if contrast_r[v.name] else np.full(2, math.nan)
        r = float(np.mean(by_order))  # the bar: the mean of the two orders' r
        summary[v.name] = (gc, sp, r)
        print(f"{v.name:<30}{gc[0]:>+13.4f} ± {gc[1]:.4f}{gu[0]:>+13.4f} ± {gu[1]:.4f}{gf[0]:>+13.4f} ± {gf[1]:.4f}"
              f"{go[0]:>+17.4f} ± {go[1]:.4f} / {gr[0]:+.4f} ± {gr[1]:.4f}"
              f"{sp[0]:>+11.4f} ± {sp[1]:.4f}{r:>12.3f}{by_order[0]:>+9.3f}/{by_order[1]:+.3f}")
    print("contrast r: the mean of the two option orders' r (the bar); r by order: original / reversed (a profile "
          "pair that separates the groups by letter position, not opinion, scores + in one order and - in the other)")

    best = max(variants, key=lambda v: summary[v.name][0][0]).name
    print(f"\ntargets (issue 13), best method by mean gain over calibrated: {best}")
    gain_cal = gains[best]["calibrated"]
    groups_seen = sorted({(a, g) for (a, _, g) in gain_cal})
    for attribute, g in groups_seen:
        m, se = pooled([e for (a, _, h), e in gain_cal.items() if (a, h) == (attribute, g)])
        print(bar(m > se, f"{best} above calibrated for {attribute} {g} by more than one paired SE: "
                          f"{m:+.4f} ± {se:.4f} (mean over seeds)"))
    sp = summary[best][1]
    print(bar(sp[0] > 2 * sp[1], f"mean specificity > 0 by more than two SE over groups and seeds: "
                                 f"{sp[0]:+.4f} ± {sp[1]:.4f}"))
    print(bar(summary[best][2] >= 0.3, f"steerability contrast r >= 0.3: r = {summary[best][2]:.3f}"))
    if "odesteer" in {v.method for v in variants}:
        for v in (v for v in variants if v.method == "odesteer"):
            gain_unst = gains[v.name]["unsteered"]
            worst = min(gain_unst.items(), key=lambda kv: kv[1][0] + kv[1][1])
            print(bar(all(m > -se for m, se in gain_unst.values()),
                      f"{v.name} never loses more than one SE against unsteered on judge questions (worst "
                      f"{worst[0]}: {worst[1][0]:+.4f} ± {worst[1][1]:.4f})"))


def judge_personas(lm, args, variant: Variant) -> list[dict[str, Any]]:  # noqa: ANN001
    """Each persona and seed: `variant` built on `--train` statements, judged on `--persona-judge` others (both
    orders) against unsteered, uniform and calibrated (fitted on the build statements); rows with the persona's
    name, the seed and the gains (mean, paired SE) of the profile over calibrated (`cal`) and unsteered
    (`unst`) and of uniform over calibrated (`uniform`)."""
    rows = []
    for name in args.personas:
        statements = load_persona(args.persona_data / f"{name}.jsonl")
        for seed in args.seeds:
            order = list(range(len(statements)))
            random.Random(seed).shuffle(order)
            train = [statements[i] for i in order[:args.train]]
            judge = [statements[i] for i in order[args.train:args.train + args.persona_judge]]
            start = time.perf_counter()
            profile = build_profile(lm, train, variant.method, variant.params, seed=seed)
            calibration = fit_calibration(train, answer_distributions(lm, train))
            report = evaluate(lm, {name: judge}, {variant.name: profile}, {variant.name: name}, {name: calibration},
                              seed=seed)
            cell = report["cells"][BOTH][variant.name][name]
            cal = (cell["gain_vs_calibrated"]["mean"], cell["gain_vs_calibrated"]["standard_error"])
            unst = (cell["gain_vs_unsteered"]["mean"], cell["gain_vs_unsteered"]["standard_error"])
            flat = report["cells"][BOTH]["uniform"][name]["gain_vs_calibrated"]
            rows.append({"name": name, "seed": seed, "cal": cal, "unst": unst,
                         "uniform": (flat["mean"], flat["standard_error"])})
            print(f"  persona {name} seed {seed} {variant.name}: layer {profile.layer} strength {profile.strength:g}, "
                  f"build {time.perf_counter() - start:.0f} s; judge gain vs calibrated {cal[0]:+.4f} ± {cal[1]:.4f}",
                  flush=True)
    return rows


def judge_people(lm, args, variant: Variant, seed: int, train: dict, judge: dict, profiles: dict,  # noqa: ANN001
                 variants: list[Variant]) -> list[dict[str, tuple[float, float]]]:
    """Simulated people of each group: their profile, the group's, and the blend, judged against the group
    (alignment averaged over both option orders, paired differences over the judge questions)."""
    rows = []
    ga, gb = list(train)
    group_variant = next((v for v in variants if v.method == variant.method), variants[0])
    unsteered_train = answer_distributions(lm, train[ga])
    unsteered = read_profile(lm, judge[ga], None)
    for g, other in ((ga, gb), (gb, ga)):
        group_readings = read_profile(lm, judge[g], profiles[f"{group_variant.name}@{g}"])
        uniform = sample_alignment(judge[g], uniform_distributions(judge[g]))  # the same in both orders
        for k in range(args.persons):
            answers = person_items(train[g], random.Random(f"{seed}:{g}:{k}"))
            items = with_contrast(answers, [train[other]]) if variant.contrast else answers
            person = build_profile(lm, items, variant.method, variant.params, seed=seed)
            # The floor the person's build judged itself against: temperature, with the lean only where it
            # helped out of fold (a lean fitted on 20 one-hot answers overshoots; this baseline is the stronger).
            calibration = choose_calibration(answers, unsteered_train, fold_indices(len(answers), seed=seed))[0]
            readings = {"person": read_profile(lm, judge[g], person), "group": group_readings,
                        "blend": read_blend(lm, judge[g], [person, profiles[f"{group_variant.name}@{g}"]])}

            def both_orders(dists: dict[str, list[np.ndarray]], target: str = g) -> np.ndarray:
                return np.mean([sample_alignment(judge[target], dists[o]) for o in ORDERS], axis=0)

            calibrated = both_orders({o: calibration.apply_all(judge[g], unsteered[o]) for o in ORDERS})
            a = {name: both_orders(r) for name, r in readings.items()}
            own_gain = a["person"] - both_orders(unsteered)
            other_gain = both_orders(readings["person"], other) - both_orders(unsteered, other)

            def diff(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
                e = paired_difference(x, y)
                return e.mean, e.standard_error

            row = {"person": diff(a["person"], calibrated), "group": diff(a["group"], calibrated),
                   "uniform": diff(uniform, calibrated), "unsteered": diff(both_orders(unsteered), calibrated),
                   "blend": diff(a["blend"], calibrated), "blend_vs_person": diff(a["blend"], a["person"]),
                   "blend_vs_group": diff(a["blend"], a["group"]), "own_vs_other": diff(own_gain, other_gain)}
            rows.append(row)
            print(f"  person {k} of {g} (seed {seed}, strength {person.strength:g}): vs calibrated person "
                  f"{row['person'][0]:+.4f}, group {row['group'][0]:+.4f}, blend {row['blend'][0]:+.4f}, uniform "
                  f"{row['uniform'][0]:+.4f}", flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
