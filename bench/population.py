"""A population of OpinionsQA groups (`steer_core.population`), and new subjects fitted against it from 20 answers.

    .venv/bin/python bench/population.py [--data DIR] [--attributes POLIDEOLOGY POLPARTY]
        [--subjects POLIDEOLOGY:Liberal POLIDEOLOGY:Conservative] [--judge-waves W43 W45 W49 W50]
        [--build-questions 400] [--judge-questions 250] [--blocks 8 12 18] [--train 20] [--seeds 0 1]
        [--persons 2] [--penalties 0.25 2] [--select waves|loo] [--cache reads.npz] [--threads 1]

The groups of `--attributes` answer the same questions (only their targets differ). The questions are split by
wave directory: those of `--judge-waves` are new questions to the population (it never sees them), the others
build it (`--build-questions` and `--judge-questions` cap how many of each, drawn once with a fixed seed). All
of them are read once, unsteered and debiased (both option orders averaged), with the prompts' states after
`--blocks`. The population's block and ridge penalty are chosen by leave-one-wave-out over the build waves
(`--select loo`: by leave-one-out, which on these waves picks a block whose leans lose on new waves).

For each subject group: the population is built on the build waves from every OTHER group (leave one group
out). For each seed the subject answers `--train` judge-wave questions, drawn at random or chosen by
`informative_questions`, and is fitted against the population (`fit_subject`, at each of `--penalties`); the
judge-wave questions neither draw took judge it. Beside it: a plain calibration (temperature and one lean,
`fit_calibration`) fitted on the same answers, uniform, and the unsteered readings; differences are paired
over the judged questions (`paired_difference`), on the debiased readings and, for the fit against the
calibration, on each option order's own reading with the same fitted maps.

`--persons K`: K simulated people per subject group and seed, each answering the same `--train` questions with
one draw from the group's distribution (one-hot answers); fitted the same way, judged against their group's
distributions on the judged questions, beside a calibration fitted on the person's own answers.

Exits with a message (status 0) when the data directory is absent.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from steer_core import load_model  # noqa: E402
from steer_core.calibration import Calibration, fit_calibration, sample_alignment  # noqa: E402
from steer_core.data import OpinionItem, load_opinionsqa, make_item, opinionsqa_groups  # noqa: E402
from steer_core.errors import SteerError  # noqa: E402
from steer_core.evaluation import Estimate, paired_difference, uniform_distributions  # noqa: E402
from steer_core.population import (  # noqa: E402
    SUBJECT_PENALTY,
    SubjectFit,
    build_population,
    fit_subject,
    informative_questions,
)
from steer_core.prompts import read_answers  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "opinionsqa"
SKIP_GROUPS = {"Refused", "nan"}  # no answer, and a group some waves lack


def load_groups(data: Path, attributes: list[str]) -> tuple[dict[str, list[OpinionItem]], list[str]]:
    """Every group of `attributes` (named `ATTR:group`) over every wave, aligned by question id, and each
    question's wave."""
    waves = sorted(data.glob("American_Trends_Panel_W*"))
    by_group: dict[str, dict[str, OpinionItem]] = {}
    wave_of: dict[str, str] = {}
    for attribute in attributes:
        names = [g for g in opinionsqa_groups(waves[0], attribute) if g not in SKIP_GROUPS]
        for group in names:
            found: dict[str, OpinionItem] = {}
            for wave in waves:
                try:
                    items = load_opinionsqa(wave, attribute, group)
                except SteerError:
                    continue
                for it in items:
                    assert it.id is not None
                    found[it.id] = it
                    wave_of[it.id] = wave.name.rsplit("_", 1)[-1]
            by_group[f"{attribute}:{group}"] = found
    shared = sorted(set.intersection(*(set(d) for d in by_group.values())))
    return {g: [d[k] for k in shared] for g, d in by_group.items()}, [wave_of[k] for k in shared]


def split_by_wave(waves: list[str], judge_waves: set[str], n_build: int, n_judge: int) -> tuple[list[int], list[int]]:
    """Question indices to build on (waves not in `judge_waves`) and to judge on (those in it), at most
    `n_build` and `n_judge` of them, drawn once with a fixed seed."""
    rng = np.random.default_rng(12345)
    build_all = [i for i, w in enumerate(waves) if w not in judge_waves]
    judge_all = [i for i, w in enumerate(waves) if w in judge_waves]
    build_idx = sorted(rng.choice(build_all, min(n_build, len(build_all)), replace=False).tolist())
    judge_idx = sorted(rng.choice(judge_all, min(n_judge, len(judge_all)), replace=False).tolist())
    return build_idx, judge_idx


def pick(items: list[OpinionItem], idx: list[int]) -> list[OpinionItem]:
    return [items[i] for i in idx]


def simulated_person(items: list[OpinionItem], rng: np.random.Generator) -> list[OpinionItem]:
    """One simulated person: an answer per question, drawn from the group's distribution."""
    return [make_item(it.question, it.options, answer=int(rng.choice(len(it.options), p=it.target)),
                      ordinal=it.ordinal, id=it.id) for it in items]


def subject_dists(fit: SubjectFit, dists: list[np.ndarray], items: list[OpinionItem],
                  states: dict[int, np.ndarray]) -> list[np.ndarray]:
    """What a profile with the fit's calibration and question lean serves for `items` read as `dists`."""
    leans = fit.question_lean.leans(states[fit.question_lean.layer])
    return [Calibration(fit.temperature, float(b)).apply(p, it.ordinal)
            for p, b, it in zip(dists, leans, items, strict=True)]


def pooled(estimates: list[Estimate]) -> str:
    """Mean of per-row estimates, the SE of that mean (rows as independent), and how many rows are > 2 SE."""
    mean = float(np.mean([e.mean for e in estimates]))
    se = math.sqrt(sum(e.standard_error ** 2 for e in estimates)) / len(estimates)
    above = sum(e.mean > 2 * e.standard_error for e in estimates)
    below = sum(e.mean < -2 * e.standard_error for e in estimates)
    return f"{mean:+.4f} ± {se:.4f}  ({above}/{len(estimates)} rows > +2 SE, {below} < -2 SE)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--attributes", nargs="+", default=["POLIDEOLOGY", "POLPARTY"])
    ap.add_argument("--subjects", nargs="+",
                    default=["POLIDEOLOGY:Liberal", "POLIDEOLOGY:Conservative", "POLIDEOLOGY:Moderate"])
    ap.add_argument("--judge-waves", nargs="+", default=["W43", "W45", "W49", "W50"])
    ap.add_argument("--build-questions", type=int, default=400)
    ap.add_argument("--judge-questions", type=int, default=250)
    ap.add_argument("--blocks", type=int, nargs="+", default=[8, 12, 18])
    ap.add_argument("--train", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--persons", type=int, default=2)
    ap.add_argument("--penalties", type=float, nargs="+", default=[SUBJECT_PENALTY])
    ap.add_argument("--select", choices=["waves", "loo"], default="waves",
                    help="choose the population's block and penalty by leave-one-wave-out (default) or leave-one-out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cache", type=Path, default=None,
                    help="an .npz of the reads: written after reading, read instead when it holds these questions "
                         "and blocks")
    args = ap.parse_args()
    print("command:", " ".join([".venv/bin/python", "bench/population.py", *sys.argv[1:]]), flush=True)
    if not args.data.is_dir():
        print(f"skipped: {args.data} is not present (the OpinionsQA waves live in ../shared/data/opinionsqa)")
        return
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # numpy's BLAS too (the ridge fits)
    t0 = time.time()

    groups, waves = load_groups(args.data, args.attributes)
    missing = [s for s in args.subjects if s not in groups]
    if missing:
        raise SystemExit(f"unknown subject group {missing[0]!r}; groups: {sorted(groups)}")
    judge_set = set(args.judge_waves)
    build_idx, judge_idx = split_by_wave(waves, judge_set, args.build_questions, args.judge_questions)
    n_judge_all = sum(w in judge_set for w in waves)
    print(f"{len(groups)} groups ({', '.join(groups)}); {len(waves)} shared questions; build waves "
          f"{sorted(set(waves) - judge_set)}: {len(build_idx)} of {len(waves) - n_judge_all} questions; judge "
          f"waves {sorted(judge_set & set(waves))}: {len(judge_idx)} of {n_judge_all}", flush=True)

    first = next(iter(groups.values()))
    questions = pick(first, build_idx + judge_idx)
    ids = np.array([str(q.id) for q in questions])
    t_read = time.time()
    cached = np.load(args.cache) if args.cache is not None and args.cache.exists() else None
    if cached is not None and np.array_equal(cached["ids"], ids) and all(f"states{b}" in cached for b in args.blocks):
        read_d = [np.asarray(r[:len(q.options)]) for r, q in zip(cached["dists"], questions, strict=True)]
        by_order = [[np.asarray(r[:len(q.options)]) for r, q in zip(cached[f"order{o}"], questions, strict=True)]
                    for o in range(2)]
        states = {b: cached[f"states{b}"] for b in args.blocks}
        print(f"reads from {args.cache}", flush=True)
    else:
        lm = load_model()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.time() - last[0] > 30 or done == total:
                last[0] = time.time()
                print(f"  read {done}/{total} ({time.time() - t_read:.0f} s)", flush=True)

        read = read_answers(lm, questions, state_layers=args.blocks, batch_size=args.batch_size, progress=progress)
        read_d, by_order, states = read.distributions, read.by_order, read.states
        print(f"read {len(questions)} questions in both orders with states after blocks {args.blocks}: "
              f"{time.time() - t_read:.0f} s", flush=True)
        if args.cache is not None:
            def padded(ds: list[np.ndarray]) -> np.ndarray:
                out = np.zeros((len(ds), max(len(d) for d in ds)))
                for r, d in enumerate(ds):
                    out[r, :len(d)] = d
                return out

            arrays: dict[str, Any] = {"ids": ids, "dists": padded(read_d), "order0": padded(by_order[0]),
                                      "order1": padded(by_order[1]), **{f"states{b}": states[b] for b in args.blocks}}
            np.savez(args.cache, **arrays)
    nb = len(build_idx)
    b_dists, j_dists = read_d[:nb], read_d[nb:]
    b_states = {k: v[:nb] for k, v in states.items()}
    j_states = {k: v[nb:] for k, v in states.items()}
    j_orders = [order[nb:] for order in by_order]

    rows: dict[str, list[Estimate]] = {}
    person_rows: dict[str, list[Estimate]] = {}

    def add(table: dict[str, list[Estimate]], name: str, a: np.ndarray, b: np.ndarray) -> Estimate:
        e = paired_difference(a, b)
        table.setdefault(name, []).append(e)
        return e

    n_judge = len(judge_idx)
    for subject in args.subjects:
        basis = {g: pick(items, build_idx) for g, items in groups.items() if g != subject}
        t_build = time.time()
        build_waves = [waves[i] for i in build_idx]
        folds = [[r for r, w in enumerate(build_waves) if w == wave] for wave in sorted(set(build_waves))]
        population = build_population(basis, b_dists, b_states, folds if args.select == "waves" else None)
        build_s = time.time() - t_build
        print(f"\n== {subject}: population of {len(basis)} other groups, block {population.layer}, "
              f"temperatures {np.round(population.temperatures, 2).tolist()}, built in {build_s:.1f} s", flush=True)
        target = pick(groups[subject], judge_idx)
        chosen = informative_questions(population, j_states, args.train)
        for seed in args.seeds:
            srng = np.random.default_rng(seed)
            drawn = sorted(srng.choice(n_judge, args.train, replace=False).tolist())
            judged = [i for i in range(n_judge) if i not in set(drawn) | set(chosen)]
            j_items = pick(target, judged)
            j_st = {k: v[judged] for k, v in j_states.items()}
            jd = [j_dists[i] for i in judged]
            align = {"unsteered": sample_alignment(j_items, jd),
                     "uniform": sample_alignment(j_items, uniform_distributions(j_items))}
            fits: dict[str, SubjectFit] = {}
            cals: dict[str, Calibration] = {}
            for how, idx in (("random", drawn), ("chosen", chosen)):
                train_items, train_dists = pick(target, idx), [j_dists[i] for i in idx]
                train_states = {k: v[idx] for k, v in j_states.items()}
                cals[how] = fit_calibration(train_items, train_dists, lean=True)
                align[f"calibrated/{how}"] = sample_alignment(j_items, cals[how].apply_all(j_items, jd))
                for pen in args.penalties:
                    t_fit = time.time()
                    fit = fit_subject(population, train_items, train_dists, train_states, penalty=pen)
                    fit_ms = 1000 * (time.time() - t_fit)
                    fits[f"{how}@{pen:g}"] = fit
                    align[f"population/{how}@{pen:g}"] = sample_alignment(j_items, subject_dists(fit, jd, j_items,
                                                                                                  j_st))
                    if seed == args.seeds[0] or how == "random":
                        weights = ", ".join(f"{g.split(':')[-1]} {w:.2f}" for g, w in fit.weight_of().items()
                                            if w >= 0.05)
                        print(f"  seed {seed} {how:6s} penalty {pen:g}: T {fit.temperature:.2f}, weights "
                              f"[{weights}], fit {fit_ms:.0f} ms", flush=True)
            print(f"  seed {seed}: {len(judged)} judged questions; mean alignment "
                  + ", ".join(f"{k} {v.mean():.4f}" for k, v in align.items()), flush=True)
            for pen in args.penalties:
                p = f"@{pen:g}"
                for how in ("random", "chosen"):
                    pa = align[f"population/{how}{p}"]
                    e1 = add(rows, f"population/{how}{p} - calibrated/{how}", pa, align[f"calibrated/{how}"])
                    e2 = add(rows, f"population/{how}{p} - uniform", pa, align["uniform"])
                    e3 = add(rows, f"population/{how}{p} - unsteered", pa, align["unsteered"])
                    per_order = []
                    for o, order_dists in enumerate(j_orders):
                        od = [order_dists[i] for i in judged]
                        e = add(rows, f"population/{how}{p} - calibrated/{how}, order {o}",
                                sample_alignment(j_items, subject_dists(fits[f"{how}{p}"], od, j_items, j_st)),
                                sample_alignment(j_items, cals[how].apply_all(j_items, od)))
                        per_order.append(str(e))
                    print(f"  seed {seed} penalty {pen:g} {how:6s}: vs calibrated {e1}  vs uniform {e2}  "
                          f"vs unsteered {e3}  vs calibrated by order {' | '.join(per_order)}", flush=True)
                add(rows, f"population/chosen{p} - population/random{p}", align[f"population/chosen{p}"],
                    align[f"population/random{p}"])
            add(rows, "calibrated/chosen - calibrated/random", align["calibrated/chosen"],
                align["calibrated/random"])
            add(rows, "calibrated/random - uniform", align["calibrated/random"], align["uniform"])

            prng = np.random.default_rng(1000 + seed)
            for _person in range(args.persons):
                palign = {"unsteered": align["unsteered"], "uniform": align["uniform"]}
                for how, idx in (("random", drawn), ("chosen", chosen)):
                    answers = simulated_person(pick(target, idx), prng)
                    train_dists = [j_dists[i] for i in idx]
                    train_states = {k: v[idx] for k, v in j_states.items()}
                    cal = fit_calibration(answers, train_dists, lean=True)
                    palign[f"calibrated/{how}"] = sample_alignment(j_items, cal.apply_all(j_items, jd))
                    for pen in args.penalties:
                        fit = fit_subject(population, answers, train_dists, train_states, penalty=pen)
                        palign[f"population/{how}@{pen:g}"] = sample_alignment(
                            j_items, subject_dists(fit, jd, j_items, j_st))
                for pen in args.penalties:
                    p = f"@{pen:g}"
                    for how in ("random", "chosen"):
                        pa = palign[f"population/{how}{p}"]
                        add(person_rows, f"person population/{how}{p} - calibrated/{how}", pa,
                            palign[f"calibrated/{how}"])
                        add(person_rows, f"person population/{how}{p} - uniform", pa, palign["uniform"])
                        add(person_rows, f"person population/{how}{p} - unsteered", pa, palign["unsteered"])
                add(person_rows, "person calibrated/random - uniform", palign["calibrated/random"],
                    palign["uniform"])

    print(f"\n== summary over {len(args.subjects)} left-out groups x {len(args.seeds)} seeds (alignment, paired over "
          "judged questions; mean of rows ± its SE)")
    width = max(len(k) for k in [*rows, *person_rows])
    for name, estimates in rows.items():
        print(f"  {name:{width}s}  {pooled(estimates)}")
    if person_rows:
        print(f"== simulated persons: {args.persons} per group and seed, one-hot answers, judged against their "
              "group's distributions")
        for name, estimates in person_rows.items():
            print(f"  {name:{width}s}  {pooled(estimates)}")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
