"""Steering quality on OpinionsQA groups that disagree, for every registered method.

    .venv/bin/python bench/quality_opinionsqa.py [--attribute POLIDEOLOGY] [--groups Liberal Conservative]
        [--train 20] [--judge 60] [--methods cold_fd diffmean ...] [--seed 0] [--threads N]

For each group: the same `--train` questions build one profile per method with `build_profile` (its own
cross-validated search over layer and strength, default parameters; the best setting's out-of-fold gain
is printed with its standard error), and `--judge` other questions judge it. The
table shows the mean alignment (1 - W1 / span) of the unsteered model and of each method on the judge
questions, per group. Data: ../shared/data/opinionsqa (every wave); without it the script says so and
exits. Every method in `steer_core.METHODS` is included unless `--methods` narrows the list.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from steer_core import METHODS, build_profile, intervention, load_model, summarize  # noqa: E402
from steer_core.data import load_opinionsqa  # noqa: E402
from steer_core.prompts import answer_distributions  # noqa: E402

OPINIONSQA = REPO.parent / "shared" / "data" / "opinionsqa"


def group_items(attribute: str, groups: list[str]) -> dict[str, list]:
    """Each group's items over every wave, aligned by question id (same questions, same order)."""
    waves = sorted(OPINIONSQA.glob("American_Trends_Panel_W*"))
    by_group = {g: {it.id: it for wave in waves for it in load_opinionsqa(wave, attribute, g)} for g in groups}
    shared = sorted(set.intersection(*(set(d) for d in by_group.values())))
    return {g: [by_group[g][key] for key in shared] for g in groups}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attribute", default="POLIDEOLOGY")
    parser.add_argument("--groups", nargs="+", default=["Liberal", "Conservative"])
    parser.add_argument("--train", type=int, default=20)
    parser.add_argument("--judge", type=int, default=60)
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    if not OPINIONSQA.is_dir():
        print(f"skipped: {OPINIONSQA} is not present (OpinionsQA data is not shipped with the repo)")
        return 0
    torch.set_num_threads(args.threads)
    methods = args.methods or sorted(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; registered: {sorted(METHODS)}")
    lm = load_model()
    data = group_items(args.attribute, args.groups)
    n = len(next(iter(data.values())))
    order = list(range(n))
    random.Random(args.seed).shuffle(order)
    if args.train + args.judge > n:
        parser.error(f"only {n} shared questions for {args.groups}")
    train_idx, judge_idx = order[:args.train], order[args.train:args.train + args.judge]
    print(f"model {lm.name}, {args.attribute} groups {args.groups}: {args.train} questions build, {args.judge} "
          f"other questions judge (seed {args.seed}); methods {methods}")

    table: dict[str, dict[str, float]] = {}
    # cross[method][(built for, judged against)]: does a group's profile move answers toward that group
    # rather than toward whatever any group would prefer?
    cross: dict[str, dict[tuple[str, str], float]] = {m: {} for m in methods}
    judges = {g: [items[i] for i in judge_idx] for g, items in data.items()}
    # The same questions (prompts) for every group, only targets differ: one unsteered reading serves all.
    unsteered = answer_distributions(lm, next(iter(judges.values())))
    for group, items in data.items():
        train = [items[i] for i in train_idx]
        judge = judges[group]
        row = {"unsteered": summarize(judge, unsteered)["alignment"]}
        for method in methods:
            start = time.perf_counter()
            profile = build_profile(lm, train, method, seed=args.seed)
            built = time.perf_counter() - start
            dists = answer_distributions(lm, judge, [intervention(profile, lm)]) if profile.strength \
                else unsteered
            row[method] = summarize(judge, dists)["alignment"]
            for other in data:
                cross[method][(group, other)] = summarize(judges[other], dists)["alignment"]
            m = profile.metrics
            print(f"  {group:<13} {method:<12} layer {profile.layer:>2} strength {profile.strength:<6g} "
                  f"held-out {m['unsteered']['alignment']:.4f} -> {m['steered']['alignment']:.4f} (best candidate "
                  f"{m['gain']['alignment']:+.4f} +- {m['gain']['standard_error']:.4f}); "
                  f"judge {row[method]:.4f} (unsteered {row['unsteered']:.4f}); build {built:.0f} s", flush=True)
        table[group] = row

    columns = ["unsteered", *methods]
    print("\nmean alignment on the judge questions (higher is better; delta vs unsteered in brackets)")
    print(f"{'group':<14}" + "".join(f"{c:>22}" for c in columns))
    for group, row in table.items():
        cells = [f"{row['unsteered']:.4f}"] + [f"{row[m]:.4f} ({row[m] - row['unsteered']:+.4f})" for m in methods]
        print(f"{group:<14}" + "".join(f"{c:>22}" for c in cells))
    print("\nprofiles judged against each group's answers (rows: built for; columns: judged against)")
    for method in methods:
        print(f"  {method}")
        for built_for in data:
            cells = "".join(f"{g[:12]:>14} {cross[method][(built_for, g)]:.4f} "
                            f"({cross[method][(built_for, g)] - table[g]['unsteered']:+.4f})" for g in data)
            print(f"    {built_for:<14}{cells}")
    if "cold_fd" in methods:
        for group, row in table.items():
            checks = [f"beats unsteered: {row['cold_fd'] > row['unsteered']}"]
            if "diffmean" in methods:
                checks.append(f"matches or beats DiffMean: {row['cold_fd'] >= row['diffmean']}")
            print(f"cold_fd on {group}: " + ", ".join(checks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
