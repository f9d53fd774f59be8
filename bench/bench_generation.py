"""The generation engine on the default model (CPU, greedy, 64 new tokens per request): what steering and
batching cost.

    .venv/bin/python bench/bench_generation.py [--threads 2] [--tokens 64] [--reps 5] [--skip-cold]

Every ratio compares configurations measured side by side in this one run, interleaved rep by rep (a busy
machine slows both sides alike). Each ratio is printed by wall clock and by the process's CPU time (the work
done, which other load on a shared machine disturbs less), as the median of the per-rep ratios, with the
ratio of medians and the per-rep range beside it. Every request generates exactly `--tokens` tokens
(`ignore_eos`), so the work compared is the same. Targets (issue 6):

1. one constant-vector profile vs unsteered, one request: time per token at most 1.05x;
2. 16 concurrent requests each with a different profile vs the same 16 unsteered, batched: throughput at
   least 0.9x;
3. batched vs one-at-a-time for 16 concurrent requests: throughput at least 2x;
4. a blend of 4 COLD-FD profiles vs 1 COLD-FD profile: time at most 1.2x.

The profiles are real: DiffMean fitted on the repo's urban-group fixture at the 16 middle layers (one
profile per layer, the middle layer's for the single-profile runs), and COLD-FD (default parameters: fd,
rank 8, bf16 storage) fitted on four disjoint 10-item subsets of the urban and rural fixtures. Positions
are each method's default (`prompt`); (1) and (2) also run with `all`, where every generated token is
steered (the worst case for a constant vector).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.engine import GenerationEngine, SamplingParams  # noqa: E402
from steer_core import get_method, intervention, load_items, load_model  # noqa: E402
from steer_core.models import LanguageModel  # noqa: E402
from steer_core.steering import RowSteering, compose  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
TOPICS = ["city life", "the countryside", "public transport", "farming", "taxes", "schools", "the internet",
          "local news", "gardening", "voting", "hospitals", "small businesses", "immigration", "sports",
          "the weather", "housing prices"]


def prompts(engine: GenerationEngine, n: int) -> list[list[int]]:
    """n distinct chat prompts of varied length (so batches really pad)."""
    out = []
    for i in range(n):
        ask = f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}." + " Be specific." * (i % 4)
        out.append(engine.tokenize_chat([{"role": "user", "content": ask}]))
    return out


def diffmean_rows(lm: LanguageModel, n: int, positions: str) -> list[RowSteering]:
    """n DiffMean profiles fitted in one pass on the urban fixture, one per layer of the middle n layers,
    each as one row's steering."""
    items = load_items(FIXTURES / "opinions_group_urban.jsonl")[:10]
    first = max(0, lm.num_layers // 2 - n // 2)
    layers = list(range(first, min(lm.num_layers, first + n)))
    profiles = get_method("diffmean").fit(lm, items, layers, {}, positions)
    rows = []
    for layer in layers:
        profiles[layer].strength = 2.0
        rows.append(compose([(intervention(profiles[layer], lm), 1.0)]))
    middle = layers.index(lm.num_layers // 2) if lm.num_layers // 2 in layers else 0
    return rows[middle:] + rows[:middle]  # the middle layer's profile first


def cold_fd_interventions(lm: LanguageModel, n: int, layer: int) -> list:
    items = load_items(FIXTURES / "opinions_group_urban.jsonl") + load_items(FIXTURES / "opinions_group_rural.jsonl")
    spec = get_method("cold_fd")
    params = spec.check_params({})
    out = []
    for k in range(n):
        subset = items[10 * k:10 * k + 10]
        profile = spec.fit(lm, subset, [layer], params, "prompt")[layer]
        profile.strength = 0.1
        out.append(intervention(profile, lm))
    return out


@dataclasses.dataclass
class Timing:
    wall: float  # seconds
    cpu: float  # CPU seconds of this process (all its threads): the work done, whatever else runs


def timed(fn: Callable[[], object]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def run_one(engine: GenerationEngine, prompt: list[int], sampling: SamplingParams, steering: RowSteering | None):
    return lambda: engine.generate(prompt, sampling, steering, timeout=3600)


def run_many(engine: GenerationEngine, batch: Sequence[list[int]], sampling: SamplingParams,
             steering: Sequence[RowSteering | None]):
    def go() -> None:
        handles = [engine.submit(p, sampling, s) for p, s in zip(batch, steering, strict=True)]
        for h in handles:
            h.result(3600)

    return go


def interleaved(configs: dict[str, Callable[[], object]], reps: int) -> dict[str, list[Timing]]:
    """Timings of each config, run once each per rep in a rotating order (after one warm-up each)."""
    for fn in configs.values():
        fn()
    times: dict[str, list[Timing]] = {name: [] for name in configs}
    names = list(configs)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            times[name].append(timed(configs[name]))
    return times


def report(title: str, times: dict[str, list[Timing]], per: float, target: tuple[str, str, float],
           throughput: bool = False, unit: str = "ms/token", table: bool = True) -> None:
    """Per config: median wall and CPU time (or throughput); then the target ratio by wall clock and by CPU
    time, as the ratio of medians and the median of the per-rep ratios (each rep's pair ran back to back)."""
    print(f"\n{title}")
    for name, ts in times.items() if table else ():
        wall = statistics.median(t.wall for t in ts)
        cpu = statistics.median(t.cpu for t in ts)
        if throughput:
            print(f"  {name:<42} {per / wall:7.1f} tok/s wall  {per / cpu:7.1f} tok/CPU-s   "
                  f"(wall reps {per / max(t.wall for t in ts):.1f}..{per / min(t.wall for t in ts):.1f})")
        else:
            print(f"  {name:<42} {wall / per * 1000:8.2f} {unit} wall  {cpu / per * 1000:8.2f} CPU   "
                  f"(wall reps {min(t.wall for t in ts) / per * 1000:.1f}..{max(t.wall for t in ts) / per * 1000:.1f})")
    num, den, bound = target
    parts = []
    for metric in ("wall", "cpu"):
        a = [getattr(t, metric) for t in times[num]]
        b = [getattr(t, metric) for t in times[den]]
        # time ratio num/den; for throughput the inverse (den time / num time)
        of_medians = statistics.median(b) / statistics.median(a) if throughput else \
            statistics.median(a) / statistics.median(b)
        paired = [(y / x if throughput else x / y) for x, y in zip(a, b, strict=True)]
        med_paired = statistics.median(paired)
        ok = (med_paired >= bound) if throughput else (med_paired <= bound)
        parts.append(f"{metric}: {med_paired:.3f}x ({'met' if ok else 'NOT met'}; ratio of medians "
                     f"{of_medians:.3f}, reps {min(paired):.3f}..{max(paired):.3f})")
    word, rel = ("throughput", ">=") if throughput else ("time", "<=")
    print(f"  => {word} [{num}] / [{den}], target {rel} {bound}x")
    for part in parts:
        print(f"     {part}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-cold", action="store_true", help="skip the COLD-FD blend part (fitting takes "
                        "a few minutes on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    layer = lm.num_layers // 2
    n = 16
    print(f"load average at the start: {', '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    print(f"model {lm.name} ({lm.num_layers} layers), {lm.device}, {lm.dtype}, {torch.get_num_threads()} threads; "
          f"{args.tokens} new tokens per request, greedy; {args.reps} reps; steering layer {layer}")
    sampling = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    batched = GenerationEngine(lm, max_batch_size=n, batch_wait_ms=10, max_new_tokens=args.tokens)
    serial = GenerationEngine(lm, max_batch_size=1, batch_wait_ms=10, max_new_tokens=args.tokens)
    batch = prompts(batched, n)
    t0 = time.perf_counter()
    rows_prompt = diffmean_rows(lm, n, "prompt")
    rows_all = [[dataclasses.replace(iv, positions="all") for iv in row] for row in rows_prompt]
    print(f"fitted {n} DiffMean profiles (layers {min(iv.layer for r in rows_prompt for iv in r)}.."
          f"{max(iv.layer for r in rows_prompt for iv in r)}) in {time.perf_counter() - t0:.1f} s")

    # 1. one request: unsteered vs one constant vector
    times = interleaved({
        "unsteered": run_one(batched, batch[0], sampling, None),
        "1 DiffMean profile (positions=prompt)": run_one(batched, batch[0], sampling, rows_prompt[0]),
        "1 DiffMean profile (positions=all)": run_one(batched, batch[0], sampling, rows_all[0]),
    }, args.reps)
    report("1. one request, time per token (prefill included)", times, args.tokens,
           ("1 DiffMean profile (positions=prompt)", "unsteered", 1.05))
    report("   same, the worst case (every generated token steered)", times, args.tokens,
           ("1 DiffMean profile (positions=all)", "unsteered", 1.05), table=False)

    # 2 and 3. sixteen concurrent requests
    total = n * args.tokens
    times = interleaved({
        "16 unsteered, batched": run_many(batched, batch, sampling, [None] * n),
        "16 distinct profiles, batched (prompt)": run_many(batched, batch, sampling, rows_prompt),
        "16 distinct profiles, batched (all)": run_many(batched, batch, sampling, rows_all),
    }, args.reps)
    print(f"   (largest batch the engine ran: {batched.stats.largest_batch})")
    report("2. sixteen concurrent requests, throughput", times, total,
           ("16 distinct profiles, batched (prompt)", "16 unsteered, batched", 0.9), throughput=True)
    report("   same, every generated token steered", times, total,
           ("16 distinct profiles, batched (all)", "16 unsteered, batched", 0.9), throughput=True, table=False)
    serial_reps = max(2, args.reps // 2)
    times = interleaved({
        "16 unsteered, batched": run_many(batched, batch, sampling, [None] * n),
        "16 unsteered, one at a time": run_many(serial, batch, sampling, [None] * n),
    }, serial_reps)
    report("3. sixteen concurrent requests: batched vs one at a time, throughput", times, total,
           ("16 unsteered, batched", "16 unsteered, one at a time", 2.0), throughput=True)
    serial.stop()

    # 4. COLD-FD: one profile vs a blend of four (J(x) is linear: one extra pass either way)
    if args.skip_cold:
        print("\n4. COLD-FD blend: skipped (--skip-cold)")
    else:
        t0 = time.perf_counter()
        cold = cold_fd_interventions(lm, 4, layer)
        print(f"\nfitted 4 COLD-FD profiles in {time.perf_counter() - t0:.1f} s")
        one = compose([(cold[0], 1.0)])
        four = compose([(iv, 0.25) for iv in cold])
        assert len(four) == 1, "a blend of COLD-FD profiles at one layer must be one intervention"
        prefill = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        times = interleaved({
            "unsteered": run_one(batched, batch[1], sampling, None),
            "1 COLD-FD profile": run_one(batched, batch[1], sampling, one),
            "blend of 4 COLD-FD profiles": run_one(batched, batch[1], sampling, four),
        }, args.reps)
        report("4. COLD-FD, one request, time per token (prefill included)", times, args.tokens,
               ("blend of 4 COLD-FD profiles", "1 COLD-FD profile", 1.2))
        times = interleaved({
            "unsteered": run_one(batched, batch[1], prefill, None),
            "1 COLD-FD profile": run_one(batched, batch[1], prefill, one),
            "blend of 4 COLD-FD profiles": run_one(batched, batch[1], prefill, four),
        }, 4 * args.reps)  # short runs: more reps
        report("   prefill alone (where all of COLD-FD's cost is)", times, 1,
               ("blend of 4 COLD-FD profiles", "1 COLD-FD profile", 1.2), unit="ms")
    batched.stop()
    print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
