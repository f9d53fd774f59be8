"""Do profiles hold in any option order? Builds of 20 items judged on new questions in both option orders.

    .venv/bin/python bench/option_orders.py [--data DIR] [--pairs POLIDEOLOGY:Liberal:Conservative ...]
        [--methods diffmean cold_fd odesteer lora] [--seeds 0] [--train 20] [--judge 100] [--threads N]
        [--groups Black 65+] [--no-survey-order-build]

For each attribute pair, seed and group, `--train` shared questions build a profile (the other group as the
contrast, as the service does for a tenant holding both) and `--judge` other questions judge it, each
presented in the survey's option order and reversed. Side by side, with paired standard errors over the
judge questions:

- `served`: the profile as the service serves it (debiased reads: both orders read and averaged, its
  calibration and question lean applied), built order-robust (the default, `orders = 2`); its gain over
  the calibrated model read the same way (a temperature and lean fitted on the build items' debiased
  reads), over the unsteered model and over uniform, in each presentation order;
- `vs sceptic's calibration`: the same served answers against a calibration fitted on the build items read
  one order at a time, in both orders, and applied to each order's own read (the baseline the issue used);
- `survey-order build`: `orders = 1` (fit, select and calibrate in the survey's order only; the old
  default) read one order at a time, as the old readers did: the failure this bench exists to show;
- `chat`: what generation gets, the served profile's steering alone, uncalibrated, read one order at a time,
  over the unsteered model read the same way.

The bars of issue 27 are printed as PASS/FAIL: in each order the served gain over calibrated differs from
the other order's by less than 2 SE, and no served profile is below unsteered by more than 1 SE.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.quality_opinionsqa import DEFAULT_DATA, DEFAULT_PAIRS, bar, group_items, pooled  # noqa: E402
from steer_core import build_profile, load_model  # noqa: E402
from steer_core.calibration import fit_calibration, sample_alignment  # noqa: E402
from steer_core.data import with_contrast  # noqa: E402
from steer_core.evaluation import ORDERS, paired_difference, read_orders, uniform_distributions  # noqa: E402
from steer_core.methods import intervention  # noqa: E402
from steer_core.option_orders import in_both_orders, split_orders  # noqa: E402
from steer_core.prompts import answer_distributions  # noqa: E402

DEFAULT_METHODS = ["diffmean", "cold_fd", "odesteer", "lora"]


def single_order_reads(lm, items: list, steering=None) -> dict[str, list[np.ndarray]]:  # noqa: ANN001
    """Each order read on its own, mapped back to the survey order."""
    by_order = split_orders(answer_distributions(lm, in_both_orders(items), steering, orders=1), len(items))
    return dict(zip(ORDERS, by_order, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS, help="ATTRIBUTE:GroupA:GroupB")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train", type=int, default=20)
    parser.add_argument("--judge", type=int, default=100)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--groups", nargs="+", help="build only these groups of the pairs (default: both of each)")
    parser.add_argument("--no-survey-order-build", action="store_true",
                        help="skip the `orders = 1` build and its columns (halves the builds)")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"skipped: {args.data} is not present (OpinionsQA data is not shipped with the repo)")
        return 0
    torch.set_num_threads(args.threads)
    lm = load_model()
    print(f"model {lm.name}; pairs {args.pairs}; seeds {args.seeds}; {args.train} build, {args.judge} judge; "
          f"methods {args.methods}")
    rows: dict[str, list[dict[str, tuple[float, float]]]] = {m: [] for m in args.methods}
    for pair in args.pairs:
        attribute, ga, gb = pair.split(":")
        data = group_items(args.data, attribute, [ga, gb])
        for seed in args.seeds:
            order = list(range(len(data[ga])))
            random.Random(seed).shuffle(order)
            train_idx, judge_idx = order[:args.train], order[args.train:args.train + args.judge]
            train = {g: [data[g][i] for i in train_idx] for g in (ga, gb)}
            judge = {g: [data[g][i] for i in judge_idx] for g in (ga, gb)}
            questions = judge[ga]
            unsteered_single = single_order_reads(lm, questions)
            unsteered_served = read_orders(lm, questions)
            train_single = split_orders(answer_distributions(lm, in_both_orders(train[ga]), orders=1), args.train)
            train_served = answer_distributions(lm, train[ga])
            for g, other in ((ga, gb), (gb, ga)):
                if args.groups and g not in args.groups:
                    continue
                items = with_contrast(train[g], [train[other]])
                # The calibrated baselines: fitted on the debiased reads (as served), and the sceptic's, on the
                # build items read one order at a time in both orders (the reversed ones as asked).
                served_cal = fit_calibration(items, train_served)
                sceptic_cal = fit_calibration(in_both_orders(items),
                                              [*train_single[0], *[p[::-1] for p in train_single[1]]])

                def align(dists: list[np.ndarray], items: list = judge[g]) -> np.ndarray:
                    return sample_alignment(items, dists)

                uniform = align(uniform_distributions(questions))
                calibrated_served = align(served_cal.apply_all(questions, unsteered_served[ORDERS[0]]))
                for method in args.methods:
                    start = time.perf_counter()
                    built = build_profile(lm, items, method, seed=seed)
                    old = None if args.no_survey_order_build else build_profile(lm, items, method, {"orders": 1},
                                                                                  seed=seed)
                    seconds = time.perf_counter() - start
                    served = read_orders(lm, questions, built)
                    old_single = None if old is None else read_orders(lm, questions, old, debiased=False)
                    steering = [intervention(built, lm)] if built.strength != 0 else None
                    chat = single_order_reads(lm, questions, steering) if steering else unsteered_single
                    row: dict[str, tuple[float, float]] = {}
                    for o, name in zip(ORDERS, ("orig", "rev"), strict=True):
                        # Each order's read is mapped back to the survey order, and a calibration moves with
                        # its options: applying it there is applying it to the reversed question.
                        sceptic_o = sceptic_cal.apply_all(questions, unsteered_single[o])
                        cells = {
                            f"served vs calibrated {name}": (align(served[o]), calibrated_served),
                            f"served vs unsteered {name}": (align(served[o]), align(unsteered_single[o])),
                            f"served vs sceptic's calibration {name}": (align(served[o]), align(sceptic_o)),
                            f"chat vs unsteered {name}": (align(chat[o]), align(unsteered_single[o])),
                        }
                        if old_single is not None:
                            cells[f"survey-order build vs sceptic's calibration {name}"] = (align(old_single[o]),
                                                                                            align(sceptic_o))
                        for key, (a, b) in cells.items():
                            d = paired_difference(a, b)
                            row[key] = (d.mean, d.standard_error)
                    gap = paired_difference(align(served[ORDERS[0]]) - calibrated_served,
                                            align(served[ORDERS[1]]) - calibrated_served)
                    row["served: original - reversed"] = (gap.mean, gap.standard_error)
                    d = paired_difference(align(served[ORDERS[0]]), uniform)
                    row["served vs uniform"] = (d.mean, d.standard_error)
                    rows[method].append(row)
                    verdict = built.metrics["verdict"]
                    old_vs = "survey-order build vs sceptic's calibration"
                    old_line = "" if old is None else (
                        f" (survey-order build {old.strength:g}: vs sceptic orig/rev "
                        f"{row[old_vs + ' orig'][0]:+.4f} / {row[old_vs + ' rev'][0]:+.4f})")
                    print(f"  {attribute} seed {seed} {g:<13} {method:<9} strength {built.strength:<8g}{old_line}; "
                          f"served vs calibrated "
                          f"{row['served vs calibrated orig'][0]:+.4f} ± {row['served vs calibrated orig'][1]:.4f}; "
                          f"{'improved' if verdict['improved'] else 'not improved'}, serves the {verdict['serves']}; "
                          f"builds {seconds:.0f} s", flush=True)
                    for key, (m, se) in row.items():  # every column now: a long run may be stopped early
                        print(f"    {key:<52}{m:+.4f} ± {se:.4f}", flush=True)

    print("\nmeans over groups and seeds (± pooled SE of the per-group paired SEs)")
    columns = list(next(iter(r for rs in rows.values() for r in rs)).keys()) if any(rows.values()) else []
    for method, method_rows in rows.items():
        if not method_rows:
            continue
        print(f"\n{method} ({len(method_rows)} group x seed)")
        for column in columns:
            m, se = pooled([r[column] for r in method_rows])
            print(f"  {column:<52}{m:+.4f} ± {se:.4f}")
    print("\nbars (issue 27), each group and seed:")
    for method, method_rows in rows.items():
        if not method_rows:
            continue
        gaps = [r["served: original - reversed"] for r in method_rows]
        print(bar(all(abs(m) <= 2 * se or (m == 0 and se == 0) for m, se in gaps),
                  f"{method}: served gain over calibrated the same in both orders within 2 SE (largest gap "
                  f"{max(abs(m) for m, _ in gaps):.2e})"))
        worst = min(min(r[f"served vs unsteered {o}"][0] + r[f"served vs unsteered {o}"][1] for o in ("orig", "rev"))
                    for r in method_rows)
        print(bar(worst >= 0 or math.isclose(worst, 0.0, abs_tol=1e-12),
                  f"{method}: never below unsteered by more than 1 SE in either order (worst mean + SE {worst:+.4f})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
