"""A build's candidate reads on the default model (CPU): shared prefix vs every candidate through the model.

    .venv/bin/python bench/bench_reads.py [--threads 2] [--reps 5] [--items 7] [--group Liberal] [--data DIR]
        [--subject-items 20] [--subject-only]

A cross-validated build reads each fold's held-out items (about 7 of 20) under every candidate: LoRA's 6
(two training lengths x three strengths), DiffMean's 5 strengths at each of its 3 layers, ODESteer's path
lengths. `answer_distributions_under` runs the blocks below the steered one once per batch when every
candidate is position-local; the plain way (`answer_distributions` over the items repeated once per
candidate, in batches of 16 rows) runs the whole model for every row. Both are timed here side by side,
interleaved, on the same items and candidates (median of `--reps`), with their largest difference in any
probability (they must read the same). The LoRA candidates come from a short fit on other items of the
group (reading cost does not depend on the trained values).

Last, a subject's fit against a population (`fit_subject_profile`): its `--subject-items` answers read
unsteered, then under a vector at the population's vector layer (the middle DiffMean layer), both debiased,
with the lean block's states; as two `read_answers` calls, and with `PromptsAtBlock` sharing the blocks below
the vector's between the two reads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_lora import DEFAULT_DATA, opinion_items  # noqa: E402
from steer_core import diffmean, load_model, lora  # noqa: E402
from steer_core.methods import default_layers  # noqa: E402
from steer_core.prompts import (  # noqa: E402
    PromptsAtBlock,
    answer_distributions,
    answer_distributions_under,
    read_answers,
)
from steer_core.steering import ConstantShift  # noqa: E402


def plain(lm, items, steerings):  # noqa: ANN001, ANN201
    flat = answer_distributions(lm, list(items) * len(steerings), [s for s in steerings for _ in items])
    return [flat[k * len(items):(k + 1) * len(items)] for k in range(len(steerings))]


def candidates(lm, spec, profile) -> list:  # noqa: ANN001
    out = []
    for s in spec.strengths(profile, lm):
        profile.strength = s
        out.append([spec.intervention(profile, lm)])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--items", type=int, default=7)
    parser.add_argument("--group", default="Liberal")
    parser.add_argument("--subject-items", type=int, default=20)
    parser.add_argument("--subject-only", action="store_true", help="time the subject fit's reads only")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    items, source = opinion_items(args.data, args.group)
    judged, fit_on = items[:args.items], items[args.items:args.items + 12]
    print(f"model {lm.name}; {len(judged)} judged items of {source}; load avg {os.getloadavg()[0]:.1f}")
    if args.subject_only:
        subject_fit_reads(lm, items[:args.subject_items], args.reps)
        return 0
    sets: dict[str, list] = {}
    params = lora.check_params({"steps": 2})
    adapters = lora.fit_grid(lm, fit_on, [lora.first_block(lm)], [lora.resolved({**params, "steps": n})
                                                                  for n in lora.STEPS], "all")
    sets[f"lora (block {lora.first_block(lm)}..)"] = [c for grid in adapters for p in grid.values()
                                                      for c in candidates(lm, lora.METHOD, p)]
    fitted = diffmean.METHOD.fit(lm, fit_on, default_layers(lm), {}, "prompt")
    for layer, profile in fitted.items():
        sets[f"diffmean (layer {layer})"] = candidates(lm, diffmean.METHOD, profile)
    for name, steerings in sets.items():
        times: dict[str, list[float]] = {"plain": [], "shared": []}
        reads = {}
        for _ in range(args.reps):
            for way, read in (("plain", plain), ("shared", answer_distributions_under)):
                start = time.perf_counter()
                reads[way] = read(lm, judged, steerings)
                times[way].append(time.perf_counter() - start)
        gap = max(float(np.abs(a - b).max()) for ka, kb in zip(reads["plain"], reads["shared"], strict=True)
                  for a, b in zip(ka, kb, strict=True))
        p, s = statistics.median(times["plain"]), statistics.median(times["shared"])
        print(f"{name:22s} {len(steerings)} candidates: plain {p:6.2f} s, shared prefix {s:6.2f} s, ratio "
              f"{s / p:.2f} (median of {args.reps}); largest probability difference {gap:.1e}; "
              f"load avg {os.getloadavg()[0]:.1f}", flush=True)
    subject_fit_reads(lm, items[:args.subject_items], args.reps)
    return 0


def subject_fit_reads(lm, items, reps: int) -> None:  # noqa: ANN001
    layers = default_layers(lm)
    layer, lean_block = layers[len(layers) // 2], 0
    shift = [ConstantShift(layer, "prompt", torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0)))]

    def two_reads():  # noqa: ANN202
        return read_answers(lm, items, state_layers=[lean_block]), read_answers(lm, items, shift, [lean_block])

    def shared():  # noqa: ANN202
        prompts = PromptsAtBlock(lm, items, layer, state_layers=[lean_block])
        return prompts.read(), prompts.read(shift)

    times: dict[str, list[float]] = {"two reads": [], "shared": []}
    reads = {}
    for _ in range(reps):
        for way, run in (("two reads", two_reads), ("shared", shared)):
            start = time.perf_counter()
            reads[way] = run()
            times[way].append(time.perf_counter() - start)
    gap = max(float(np.abs(np.concatenate(a.distributions) - np.concatenate(b.distributions)).max())
              for a, b in zip(reads["two reads"], reads["shared"], strict=True))
    p, s = statistics.median(times["two reads"]), statistics.median(times["shared"])
    print(f"subject fit reads ({len(items)} items, both orders, unsteered then steered at block {layer}): two full "
          f"reads {p:6.2f} s, shared below block {layer} {s:6.2f} s, ratio {s / p:.2f} (median of {reps}); "
          f"largest probability difference {gap:.1e}; load avg {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
