"""Subject profiles served from a population, as the service serves them, on new questions and left-out groups.

    .venv/bin/python bench/population_served.py [--data DIR] [--attributes POLIDEOLOGY RACE AGE]
        [--pairs POLIDEOLOGY:Liberal:Conservative RACE:Black:White AGE:18-29:65+] [--judge-waves W43 W45 W49 W50]
        [--build-questions 300] [--judge-questions 150] [--train 20] [--seeds 0 1 2] [--persons 1]
        [--per-subject diffmean] [--threads 2]

The groups of `--attributes` answered the same questions. Questions of `--judge-waves` are new to every
population; the others build it. For each pair both groups are left out of the population (learned with
`learn_population` from all the other groups, as the worker does), then each group of the pair is a new
subject: for each seed it answers `--train` judge-wave questions drawn at random and gets its profile from
`fit_subject_profile` (what `POST /v1/profiles` with a population runs); the other judge-wave questions judge
it. Side by side, paired over the judged questions:

- `served`: the subject's profile as `/v1/score` serves it (both orders read and averaged, its steering, its
  calibration and question lean), against a calibration (temperature and lean) fitted on the same 20 answers
  read the same way, against uniform and against the unsteered model; and each option order read on its own
  with the same maps (what a single-order reader gets);
- `lean only`: the population without its steering (strength 0): calibration and question lean alone;
- `chat`: what generation gets, the profile's steering alone, uncalibrated, each order read on its own,
  against the unsteered model read the same way;
- `per-subject` (`--per-subject METHOD`): today's per-subject build from the same 20 answers;
- specificity (the gain over unsteered for the subject's own group minus that for the other group of the
  pair) and the steerability contrast r between the pair's two served profiles;
- `person`: `--persons` simulated people per group and seed, each answering the same questions with one draw
  from the group's distribution, fitted the same way, judged on the group's distributions, against a
  calibration fitted on the person's own answers.

Costs printed: the population's build time and each subject fit's wall time (the model already loaded).
Exits with a message (status 0) when the data directory is absent.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.population import DEFAULT_DATA, load_groups, pick, simulated_person, split_by_wave  # noqa: E402
from steer_core import build_profile, load_model  # noqa: E402
from steer_core.calibration import Calibration, fit_calibration, sample_alignment  # noqa: E402
from steer_core.data import OpinionItem, with_contrast  # noqa: E402
from steer_core.evaluation import Estimate, paired_difference, steerability_contrast  # noqa: E402
from steer_core.methods import intervention  # noqa: E402
from steer_core.models import LanguageModel  # noqa: E402
from steer_core.option_orders import average_orders, in_both_orders, split_orders  # noqa: E402
from steer_core.population import Population  # noqa: E402
from steer_core.population_build import fit_subject_profile, learn_population  # noqa: E402
from steer_core.profile import Profile  # noqa: E402
from steer_core.prompts import read_answers  # noqa: E402

ORDER_NAMES = ("orig", "rev")


def served_reads(lm: LanguageModel, items: list[OpinionItem], profile: Profile | None) -> dict[str, list]:
    """One read of `items` in both orders under `profile`'s steering: `raw` each order uncalibrated (chat),
    `orig`/`rev` each order with the profile's maps, `both` the orders averaged with its maps (/v1/score)."""
    steering = [intervention(profile, lm)] if profile is not None and profile.strength != 0 else None
    lean = profile.question_lean if profile is not None else None
    layers = [lean.layer] if lean is not None else []
    n = len(items)
    read = read_answers(lm, in_both_orders(items), steering, layers, orders=1)
    raw = split_orders(read.distributions, n)
    states = [{k: v[:n] for k, v in read.states.items()}, {k: v[n:] for k, v in read.states.items()}]
    mean_states = {k: 0.5 * (v[:n] + v[n:]) for k, v in read.states.items()}

    def mapped(dists: list[np.ndarray], st: dict[int, np.ndarray]) -> list[np.ndarray]:
        if profile is None:
            return dists
        return [c.apply(p, it.ordinal) for c, p, it in zip(profile.calibrations(items, st), dists, items, strict=True)]

    # A question lean reads each order's own prompt; mapped back, the reversed prompt's lean is read off the
    # reversed state and acts on the distribution in survey order the same way (ordinal z follows the options).
    return {"raw": raw, "orig": mapped(raw[0], states[0]), "rev": mapped(raw[1], states[1]),
            "both": mapped(average_orders(raw), mean_states)}


def calibrated(cal: Calibration, items: list[OpinionItem], reads: dict[str, list]) -> dict[str, list]:
    return {"orig": cal.apply_all(items, reads["raw"][0]), "rev": cal.apply_all(items, reads["raw"][1]),
            "both": cal.apply_all(items, average_orders(reads["raw"]))}


def progress_printer(start: float) -> Callable[[int, int, str], None]:
    last = [0.0]

    def progress(done: int, total: int, stage: str) -> None:
        if time.time() - last[0] > 60 or done == total:
            last[0] = time.time()
            print(f"    population {done}/{total}: {stage} ({time.time() - start:.0f} s)", flush=True)

    return progress


def pooled(estimates: list[Estimate]) -> tuple[float, float]:
    return (float(np.mean([e.mean for e in estimates])),
            math.sqrt(sum(e.standard_error ** 2 for e in estimates)) / len(estimates))


def summarize(rows: dict[str, list[Estimate]], contrast_r: dict[str, list[float]], fit_seconds: list[float],
              when: str) -> None:
    """Every column so far (printed after each pair: a long run may be stopped early)."""
    print(f"\n== summary {when} (mean of rows ± pooled SE; rows > +2 SE / < -2 SE)", flush=True)
    width = max(len(k) for k in rows)
    for name, estimates in rows.items():
        m, se = pooled(estimates)
        above = sum(e.mean > 2 * e.standard_error for e in estimates)
        below = sum(e.mean < -2 * e.standard_error for e in estimates)
        print(f"  {name:{width}s}  {m:+.4f} ± {se:.4f}  ({above}/{len(estimates)} > +2 SE, {below} < -2 SE)")
    for pair, rs in contrast_r.items():
        print(f"  contrast r {pair}: {np.nanmean(rs):+.3f} ({', '.join(f'{r:+.3f}' for r in rs)})")
    if fit_seconds:
        print(f"  subject fit: median {np.median(fit_seconds):.1f} s, p95 {np.percentile(fit_seconds, 95):.1f} s "
              f"({len(fit_seconds)} fits, model loaded)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--attributes", nargs="+", default=["POLIDEOLOGY", "RACE", "AGE"])
    ap.add_argument("--pairs", nargs="+",
                    default=["POLIDEOLOGY:Liberal:Conservative", "RACE:Black:White", "AGE:18-29:65+"])
    ap.add_argument("--judge-waves", nargs="+", default=["W43", "W45", "W49", "W50"])
    ap.add_argument("--build-questions", type=int, default=300)
    ap.add_argument("--judge-questions", type=int, default=150)
    ap.add_argument("--train", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--persons", type=int, default=1)
    ap.add_argument("--per-subject", default=None, help="a method: also build today's per-subject profile")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print("command:", " ".join([".venv/bin/python", "bench/population_served.py", *sys.argv[1:]]), flush=True)
    if not args.data.is_dir():
        print(f"skipped: {args.data} is not present (the OpinionsQA waves live in ../shared/data/opinionsqa)")
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.time()
    groups, waves = load_groups(args.data, args.attributes)
    judge_set = set(args.judge_waves)
    build_idx, judge_idx = split_by_wave(waves, judge_set, args.build_questions, args.judge_questions)
    build_waves = [waves[i] for i in build_idx]
    folds = [[r for r, w in enumerate(build_waves) if w == wave] for wave in sorted(set(build_waves))]
    print(f"{len(groups)} groups; {len(waves)} shared questions; build {len(build_idx)} questions of waves "
          f"{sorted(set(build_waves))}; judge {len(judge_idx)} of waves {sorted(judge_set & set(waves))}", flush=True)
    lm = load_model()
    rows: dict[str, list[Estimate]] = {}
    fit_seconds: list[float] = []
    contrast_r: dict[str, list[float]] = {}

    def add(name: str, a: np.ndarray, b: np.ndarray) -> Estimate:
        e = paired_difference(a, b)
        rows.setdefault(name, []).append(e)
        return e

    for pair in args.pairs:
        attribute, ga, gb = pair.split(":")
        names = (f"{attribute}:{ga}", f"{attribute}:{gb}")
        basis = {g: pick(items, build_idx) for g, items in groups.items() if g not in names}
        t_build = time.time()
        population, report = learn_population(lm, basis, folds, progress_printer(t_build))
        print(f"\n== {pair}: population of {len(basis)} groups x {len(build_idx)} questions built in "
              f"{time.time() - t_build:.0f} s; lean block {population.layer}, steering block "
              f"{population.vector_layer}, strength {population.strength:g}; chat gain by strength on held-out "
              "questions: " + ", ".join(f"{s} {v['mean']:+.4f} ± {v['standard_error']:.4f}"
                                        for s, v in report["chat_gain_by_strength"].items()), flush=True)
        lean_only = Population(population.groups, population.layer, population.center, population.scale,
                               population.weight, population.intercept, population.temperatures)
        questions = pick(groups[names[0]], judge_idx)
        unsteered = served_reads(lm, questions, None)
        for seed in args.seeds:
            drawn = sorted(np.random.default_rng(seed).choice(len(judge_idx), args.train, replace=False).tolist())
            judged = [i for i in range(len(judge_idx)) if i not in set(drawn)]
            base = {k: ([[v[o][i] for i in judged] for o in range(2)] if k == "raw" else [v[i] for i in judged])
                    for k, v in unsteered.items()}
            both_served: dict[str, list[np.ndarray]] = {}
            gains: dict[str, np.ndarray] = {}
            for g in names:
                target = pick(groups[g], judge_idx)
                train, items = pick(target, drawn), pick(target, judged)
                start = time.time()
                profile = fit_subject_profile(lm, population, train)
                fit_seconds.append(time.time() - start)
                served = served_reads(lm, items, profile)
                # Without steering the served profile is the lean-only one: no second fit and read.
                lean = (served_reads(lm, items, fit_subject_profile(lm, lean_only, train)) if profile.strength
                        else served)
                cal = fit_calibration(train, [unsteered["both"][i] for i in drawn])
                cal_reads = calibrated(cal, items, base)
                align = lambda dists, its=items: sample_alignment(its, dists)  # noqa: E731
                uniform = align([np.full(len(it.options), 1 / len(it.options)) for it in items])
                for view in ("both", "orig", "rev"):
                    add(f"served vs calibrated ({view})", align(served[view]), align(cal_reads[view]))
                    add(f"lean only vs calibrated ({view})", align(lean[view]), align(cal_reads[view]))
                    add(f"served vs uniform ({view})", align(served[view]), uniform)
                for o, name in enumerate(ORDER_NAMES):
                    add(f"served vs unsteered ({name})", align(served[name]), align(base["raw"][o]))
                    add(f"chat vs unsteered ({name})", align(served["raw"][o]), align(base["raw"][o]))
                gains[g] = align(served["both"]) - align(base["both"])
                both_served[g] = served["both"]
                if args.per_subject:
                    other = names[1] if g == names[0] else names[0]
                    built = build_profile(lm, with_contrast(train, [pick(pick(groups[other], judge_idx), drawn)]),
                                          args.per_subject, seed=seed)
                    today = served_reads(lm, items, built)
                    for view in ("both", "orig", "rev"):
                        add(f"per-subject {args.per_subject} vs calibrated ({view})", align(today[view]),
                            align(cal_reads[view]))
                    add(f"served vs per-subject {args.per_subject} (both)", align(served["both"]),
                        align(today["both"]))
                weights = ", ".join(f"{k.split(':')[-1]} {w:.2f}" for k, w in
                                    profile.metrics["population"]["weights"].items() if w >= 0.05)
                e = rows["served vs calibrated (both)"][-1]
                print(f"  seed {seed} {g:24s} fit {fit_seconds[-1]:.1f} s; weights [{weights}]; served vs "
                      f"calibrated {e}; chat vs unsteered {rows['chat vs unsteered (orig)'][-1]} / "
                      f"{rows['chat vs unsteered (rev)'][-1]}", flush=True)
                prng = np.random.default_rng(1000 + seed)
                for _ in range(args.persons):
                    answers = simulated_person(train, prng)
                    person = served_reads(lm, items, fit_subject_profile(lm, population, answers))
                    person_cal = calibrated(fit_calibration(answers, [unsteered["both"][i] for i in drawn]),
                                            items, base)
                    for view in ("both", "orig", "rev"):
                        add(f"person served vs own calibration ({view})", align(person[view]),
                            align(person_cal[view]))
            a, b = names
            rows.setdefault("specificity (both)", []).append(paired_difference(gains[a], gains[b]))
            rows["specificity (both)"].append(paired_difference(gains[b], gains[a]))
            contrast_r.setdefault(pair, []).append(steerability_contrast(
                pick(pick(groups[a], judge_idx), judged), pick(pick(groups[b], judge_idx), judged),
                both_served[a], both_served[b]))
            print(f"  seed {seed} contrast r {contrast_r[pair][-1]:+.3f}", flush=True)

        summarize(rows, contrast_r, fit_seconds, f"after {pair}")
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
