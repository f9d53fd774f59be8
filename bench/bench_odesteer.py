"""ODESteer on the default model (CPU): build time, per-token cost of the ODE, profile size, and
optionally held-out quality against DiffMean and the unsteered model.

    .venv/bin/python bench/bench_odesteer.py [--threads N] [--tokens 64] [--reps 5] [--quality [--methods ...]]

Every ratio is measured side by side in this one run (unsteered and steered runs interleaved), so a
busy machine slows both alike. Targets (issue 4): build from 20 items < 60 s; the ODE (10 Euler steps)
at most 15% over an unsteered decode step.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from steer_core import build_profile, get_method, intervention, load_items, load_model, summarize  # noqa: E402
from steer_core.activations import answer_activations  # noqa: E402
from steer_core.data import load_opinionsqa  # noqa: E402
from steer_core.odesteer import DEFAULTS, BarrierFlow, contrast_weights, fit_barrier  # noqa: E402
from steer_core.prompts import answer_distributions, encode  # noqa: E402
from steer_core.sketch import CountSketch  # noqa: E402
from steer_core.steering import apply  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
WAVES = SHARED / "opinionsqa"
EXPLORED = "American_Trends_Panel_W27"  # looked at while designing the T grid: kept out of these numbers
FIXTURE = REPO / "tests" / "fixtures" / "opinions_group_urban.jsonl"
CHAT = [{"role": "user", "content": "Write a short paragraph about what makes a good neighbourhood to live in."}]


def opinion_items(group: str) -> tuple[list, str]:
    """One POLIDEOLOGY group's OpinionsQA items pooled over the waves (no wave has 70 questions for a
    group), in a seeded shuffle; the repo fixture when ../shared is absent."""
    waves = sorted(p for p in WAVES.glob("American_Trends_Panel_W*") if p.name != EXPLORED) if WAVES.is_dir() else []
    if not waves:
        items = load_items(FIXTURE)
        random.Random(0).shuffle(items)
        return items, f"{FIXTURE.name} (../shared/data absent)"
    items = [it for wave in waves for it in load_opinionsqa(wave, "POLIDEOLOGY", group)]
    random.Random(0).shuffle(items)
    names = ",".join(w.name.rsplit("_", 1)[-1] for w in waves)
    return items, f"OpinionsQA POLIDEOLOGY:{group}, {len(items)} questions pooled from waves {names}"


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_build(lm, items) -> object:
    print(f"\n== build from {len(items)} items (default layers {get_method('odesteer').layers(lm)}) ==")
    layers = get_method("odesteer").layers(lm)
    acts, t_acts = timed(answer_activations, lm, items, layers)
    sketch, t_sketch = timed(CountSketch.create, lm.hidden_size, DEFAULTS["degree"], DEFAULTS["n_components"],
                             DEFAULTS["gamma"], DEFAULTS["coef0"], DEFAULTS["seed"])
    pos_w, neg_w = contrast_weights(acts.target, acts.valid)
    pw, nw = pos_w[acts.valid], neg_w[acts.valid]
    z = acts.by_layer[layers[0]][acts.valid]
    _, t_features = timed(sketch.features, z)
    _, t_lr = timed(fit_barrier, sketch, z[pw > 0], z[nw > 0], pw[pw > 0], nw[nw > 0])
    print(f"  parts: activations of {int(acts.valid.sum())} (item, option) texts at {len(layers)} layers "
          f"{t_acts:.1f} s; sketch hashes {t_sketch * 1e3:.1f} ms; features {t_features * 1e3:.0f} ms; "
          f"logistic regression {t_lr:.2f} s per layer")
    stages: list[tuple[float, str]] = []
    cpu_start = time.process_time()
    start = time.perf_counter()
    profile, t_build = timed(build_profile, lm, items, "odesteer",
                             progress=lambda d, t, s: stages.append((time.perf_counter() - start, s)))
    fit_end = next((t for t, s in stages if s == "score unsteered"), float("nan"))
    folds_start = next((t for t, s in stages if s.startswith("fold")), float("nan"))
    cpu = time.process_time() - cpu_start
    m = profile.metrics
    print(f"  build_profile: {t_build:.1f} s wall (fit on all items {fit_end:.1f} s, unsteered scores "
          f"{folds_start - fit_end:.1f} s, {m['folds']} folds of fit + {len(m['search'])} settings "
          f"{t_build - folds_start:.1f} s); {cpu:.0f} CPU-seconds")
    print(f"  target < 60 s: {'met' if t_build < 60 else 'NOT met'} on this machine "
          f"(torch threads {torch.get_num_threads()}, load average {_load():.1f})")
    print(f"  chose layer {profile.layer}, T = {profile.strength:g} (mean |a| at that layer "
          f"{float(profile.tensors['activation_norm']):.1f}); held-out alignment {m['unsteered']['alignment']:.4f}"
          f" -> {m['steered']['alignment']:.4f} (best candidate {m['gain']['alignment']:+.4f} +- "
          f"{m['gain']['standard_error']:.4f}{'' if m['improved'] else ': strength 0'})")
    size = len(profile.to_bytes())
    print(f"  profile size: {size} bytes ({size / 1024:.1f} KiB): coef {profile.tensors['coef'].numel()} fp32, "
          f"hashes {tuple(profile.tensors['index_hash'].shape)} int32 + int8")
    return profile


class _Timed:
    """Wraps an intervention and adds up the time its displacement takes inside the hooks."""

    def __init__(self, iv: BarrierFlow) -> None:
        self.iv, self.layer, self.positions = iv, iv.layer, iv.positions
        self.seconds, self.calls = 0.0, 0

    def displacement(self, hidden, ctx, rows):
        start = time.perf_counter()
        out = self.iv.displacement(hidden, ctx, rows)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def bench_decode(lm, profile, tokens: int, reps: int) -> None:
    print(f"\n== per generated token: greedy generate {tokens} tokens, batch 1, variants interleaved x{reps} ==")
    if profile.strength == 0:  # measure the cost anyway, at the middle of the grid
        profile.strength = get_method("odesteer").strengths(profile, lm)[2]
    flow: BarrierFlow = intervention(profile, lm)
    prompt = lm.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    batch = encode(lm, [prompt])
    n_prompt = batch["input_ids"].shape[1]
    kwargs = dict(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                  pad_token_id=lm.tokenizer.pad_token_id)
    variants = {
        "unsteered": None,
        "hooks, T=0": BarrierFlow(flow.layer, flow.positions, flow.parts, 0.0),
        "ODE euler x10": flow,
        "ODE euler x1": BarrierFlow(flow.layer, flow.positions, flow.parts, flow.path_length, "euler", 1),
        "ODE rk4 x10": BarrierFlow(flow.layer, flow.positions, flow.parts, flow.path_length, "rk4", 10),
    }

    def run(iv) -> tuple[float, float]:
        """(wall, CPU) seconds of one generate; prefill included, one ODE solve per token."""
        with torch.no_grad():
            wall, cpu = time.perf_counter(), time.process_time()
            if iv is None:
                lm.model.generate(**batch, **kwargs)
            else:
                with apply(lm, [iv], prompt_length=n_prompt):
                    lm.model.generate(**batch, **kwargs)
            return time.perf_counter() - wall, time.process_time() - cpu

    run(None)  # warm up
    walls: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    in_hook: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, iv in variants.items():
            wrapped = None if iv is None else _Timed(iv)
            wall, cpu = run(wrapped)
            walls[name].append(wall / tokens)
            cpus[name].append(cpu / tokens)
            if wrapped is not None:
                in_hook[name].append(wrapped.seconds / wrapped.calls)
    base_wall, base_cpu = min(walls["unsteered"]), min(cpus["unsteered"])
    spread = (max(walls["unsteered"]) - base_wall) / base_wall * 100
    print(f"  (torch threads {torch.get_num_threads()}, load average {_load():.1f}; unsteered wall time varies by "
          f"{spread:.0f}% between repetitions; each figure is the best of {reps})")
    print(f"  {'variant':<16}{'wall ms/token':>14}{'vs unsteered':>13}{'CPU ms/token':>14}{'vs unsteered':>13}"
          f"{'in-hook ms/call':>17}{'% of a step':>13}")
    for name in variants:
        wall, cpu = min(walls[name]), min(cpus[name])
        hook = min(in_hook[name]) if in_hook[name] else 0.0
        print(f"  {name:<16}{wall * 1e3:>14.2f}{(wall / base_wall - 1) * 100:>+12.1f}%{cpu * 1e3:>14.2f}"
              f"{(cpu / base_cpu - 1) * 100:>+12.1f}%{hook * 1e3:>17.3f}{hook / base_wall * 100:>12.1f}%")
    cpu_ratio = min(cpus["ODE euler x10"]) / base_cpu - 1
    hook_ratio = min(in_hook["ODE euler x10"]) / base_wall
    print(f"  target <= 15% (10 Euler steps): {'met' if max(cpu_ratio, hook_ratio) <= 0.15 else 'NOT met'}: "
          f"CPU time per token {cpu_ratio * 100:+.1f}% vs unsteered; the displacement measured inside the hook "
          f"is {hook_ratio * 100:.1f}% of an unsteered step (wall-clock ratios are noisy on a busy machine)")


def bench_quality(lm, n_build: int, n_judge: int, methods: list[str]) -> None:
    print(f"\n== held-out alignment: {n_build} items to build (layer and strength chosen by build_profile), "
          f"{n_judge} others to judge ==")
    print(f"  {'group':<14}{'unsteered':>10}" + "".join(f"{m:>12}" for m in methods) + "   chosen (layer, strength;"
          " the build's own held-out estimate)")
    for group in ("Liberal", "Conservative"):
        items, source = opinion_items(group)
        build, judge = items[:n_build], items[n_build:n_build + n_judge]
        row = {"unsteered": summarize(judge, answer_distributions(lm, judge))["alignment"]}
        chosen = []
        for method in methods:
            profile = build_profile(lm, build, method)
            steering = [intervention(profile, lm)] if profile.strength else None
            row[method] = summarize(judge, answer_distributions(lm, judge, steering))["alignment"]
            m = profile.metrics
            chosen.append(f"{method} ({profile.layer}, {profile.strength:.3g}; its held-out "
                          f"{m['unsteered']['alignment']:.3f}->{m['best_candidate']['alignment']:.3f})")
        print(f"  {group:<14}{row['unsteered']:>10.4f}" + "".join(f"{row[m]:>12.4f}" for m in methods)
              + f"   {', '.join(chosen)}  [{len(judge)} judged; {source}]", flush=True)


def _load() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--items", type=int, default=20, help="items to build from")
    parser.add_argument("--quality", action="store_true", help="also compare with DiffMean (slow on CPU)")
    parser.add_argument("--judge", type=int, default=50, help="held-out items judged by --quality")
    parser.add_argument("--methods", default="diffmean,odesteer", help="methods compared by --quality")
    parser.add_argument("--skip-build", action="store_true", help="only the decode measurement")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm, t_load = timed(load_model)
    items, source = opinion_items("Liberal")
    print(f"model {lm.name} ({lm.num_layers} layers, hidden {lm.hidden_size}) on {lm.device}, loaded in {t_load:.1f} s;"
          f" items: {source}")
    if args.skip_build:
        fitted = get_method("odesteer").fit(lm, items[:args.items], [lm.num_layers // 2],
                                            get_method("odesteer").check_params({}), "last")
        profile = fitted[lm.num_layers // 2]
        profile.strength = 0.0
    else:
        profile = bench_build(lm, items[:args.items])
    bench_decode(lm, profile, args.tokens, args.reps)
    if args.quality:
        bench_quality(lm, args.items, args.judge, args.methods.split(","))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
