"""COLD-FD on the default model (CPU): build time, profile size and fidelity, request cost, fd vs jvp.

    .venv/bin/python bench/bench_cold.py [--threads N] [--reps 7] [--group Liberal]

Every ratio is measured side by side in this one run (unsteered and steered requests interleaved), so a
busy machine slows both alike. Targets (issue 3), 20 training items:
- build (gradient, compression and the held-out search included) < 60 s;
- profile < 4 MB with fidelity >= 0.95 (cosine of its dZ with the uncompressed gradient's dZ);
- extra cost of a request over an unsteered forward of the same prompt: fd <= 1.2 (L+1)/n_layers,
  jvp <= 3 (L+1)/n_layers;
- fd and jvp displacements agree: cosine >= 0.99 (fp32).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from steer_core import build_profile, intervention, load_items, load_model  # noqa: E402
from steer_core import cold_fd as cf  # noqa: E402
from steer_core.blocks import block_inputs  # noqa: E402
from steer_core.cold import sample_gradients  # noqa: E402
from steer_core.data import load_opinionsqa  # noqa: E402
from steer_core.prompts import encode_items  # noqa: E402
from steer_core.steering import apply  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
WAVES = sorted((SHARED / "opinionsqa").glob("American_Trends_Panel_W*"))
FIXTURE = REPO / "tests" / "fixtures" / "opinions_group_urban.jsonl"


def opinion_items(group: str) -> tuple[list, str]:
    """A group's OpinionsQA items from every wave (seeded shuffle), or the repo fixture without ../shared."""
    if WAVES:
        items = [it for wave in WAVES for it in load_opinionsqa(wave, "POLIDEOLOGY", group)]
        source = f"OpinionsQA ({len(WAVES)} waves) POLIDEOLOGY:{group}"
    else:
        items = load_items(FIXTURE)
        source = f"{FIXTURE.name} (../shared/data absent)"
    random.Random(0).shuffle(items)
    return items, source


def cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    a, b = a[mask].flatten().float(), b[mask].flatten().float()
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))


def displacement(lm, items, pert, layer, mode):
    batch = encode_items(lm, items)
    args, kwargs = block_inputs(lm, batch, 0)
    mask = batch["attention_mask"].bool()
    if mode == "jvp":
        _, tan = cf.tangents(lm, args, kwargs, batch["input_ids"], pert, layer, torch.float32)
        return tan[layer], mask
    with torch.no_grad():
        base = cf.run_blocks(lm, args, kwargs, batch["input_ids"], None, 0.0, layer, torch.float32)[layer]
        moved = cf.run_blocks(lm, args, kwargs, batch["input_ids"], pert, 1e-3, layer, torch.float32)[layer]
    return (moved - base) / 1e-3, mask


def bench_build(lm, train) -> cf.Profile:
    print(f"\n== build cold_fd from {len(train)} items (default params {cf.check_params({})}) ==")
    stages: list[tuple[float, str]] = []
    start = time.perf_counter()
    profile = build_profile(lm, train, "cold_fd",
                            progress=lambda done, total, stage: stages.append((time.perf_counter() - start, stage)))
    total = time.perf_counter() - start
    fit_end = next(t for t, s in stages if s == "score unsteered")
    folds_start = next(t for t, s in stages if s.startswith("fold"))
    m = profile.metrics
    print(f"build: {total:.1f} s (target < 60 s): fit on all items {fit_end:.1f} s, unsteered scores "
          f"{folds_start - fit_end:.1f} s, {m['folds']} folds (fit + {len(m['search'])} settings each) "
          f"{total - folds_start:.1f} s")
    print(f"chose layer {profile.layer}, strength {profile.strength} "
          f"(held-out alignment {m['unsteered']['alignment']:.4f} -> {m['steered']['alignment']:.4f})")
    for row in m["search"]:
        print(f"   layer {row['layer']:>2} strength {row['strength']:<5} alignment {row['alignment']:.4f}")
    c = profile.params["compression"]
    print(f"profile: {profile.nbytes() / 1e6:.2f} MB (target < 4 MB) vs {c['uncompressed_bytes'] / 1e6:.1f} MB "
          f"uncompressed (x{c['uncompressed_bytes'] / profile.nbytes():.0f}); rank {c['rank']} {c['storage']}, "
          f"{c['embedding_rows']} embedding rows; fidelity on its sample {c['fidelity']:.4f} "
          f"(min {c['fidelity_min']:.4f}, {c['fidelity_prompts']} prompts)")
    return profile


def bench_fidelity(lm, profile, train, heldout) -> None:
    layer = profile.layer
    strength = profile.strength or cf.STRENGTHS[1]
    print(f"\n== fidelity and fd vs jvp on {len(heldout)} held-out prompts (layer {layer}) ==")
    grads = sample_gradients(lm, train, profile.params["loss"], param_layer=layer)
    unit = strength * profile.params["unit_scale"]
    full = cf.Perturbation.descent(lm, grads).restrict(lm, layer).scaled(unit)
    compressed = cf.Perturbation.from_tensors(profile.tensors, profile.params["embedding_scale"]).scaled(unit)
    exact, mask = displacement(lm, heldout, full, layer, "jvp")
    ours, _ = displacement(lm, heldout, compressed, layer, "jvp")
    ours_fd, _ = displacement(lm, heldout, compressed, layer, "fd")
    per_prompt = [cosine(ours[i], exact[i], mask[i]) for i in range(len(heldout))]
    print(f"fidelity (compressed vs uncompressed dZ): mean {statistics.mean(per_prompt):.4f}, "
          f"min {min(per_prompt):.4f} (target >= 0.95)")
    fd_jvp = [cosine(ours_fd[i], ours[i], mask[i]) for i in range(len(heldout))]
    print(f"fd vs jvp (fp32): mean cosine {statistics.mean(fd_jvp):.5f}, min {min(fd_jvp):.5f} (target >= 0.99)")


def bench_cost(lm, profile, prompts, reps: int) -> None:
    layer = profile.layer
    print(f"\n== request cost, one prompt at a time, layer {layer} of {lm.num_layers} ==")
    profile.strength = profile.strength or cf.STRENGTHS[1]
    steering = {}
    for mode in ("fd", "jvp"):
        profile.params["mode"] = mode
        steering[mode] = intervention(profile, lm)
    batches = [encode_items(lm, [it]) for it in prompts]
    keep_last = {"logits_to_keep": 1}

    def run(mode: str | None, batch) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            if mode is None:
                lm.model(**batch, use_cache=False, **keep_last)
            else:
                with apply(lm, [steering[mode]]):
                    lm.model(**batch, use_cache=False, **keep_last)
        return time.perf_counter() - start

    for batch in batches[:2]:  # warm up
        for mode in (None, "fd", "jvp"):
            run(mode, batch)
    times: dict[str | None, list[float]] = {None: [], "fd": [], "jvp": []}
    for _ in range(reps):
        for batch in batches:
            for mode in (None, "fd", "jvp"):
                times[mode].append(run(mode, batch))
    base = statistics.median(times[None])
    share = (layer + 1) / lm.num_layers
    tokens = statistics.mean(b["input_ids"].shape[1] for b in batches)
    print(f"unsteered forward (prefill, last logits only): {base * 1e3:.1f} ms median, {tokens:.0f} tokens")
    for mode, factor in (("fd", 1.2), ("jvp", 3.0)):
        extra = statistics.median(times[mode]) / base - 1
        print(f"{mode}: extra {extra:.3f} x the unsteered forward; target <= {factor} x (L+1)/n = "
              f"{factor * share:.3f} -> {'met' if extra <= factor * share else 'MISSED'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--group", default="Liberal")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    items, source = opinion_items(args.group)
    train, heldout = items[:20], items[20:28]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model {lm.name} ({lm.num_layers} layers, {lm.dtype}), CPU, {args.threads} threads, load average "
          f"{load:.1f}; data {source}")
    profile = bench_build(lm, train)
    bench_fidelity(lm, profile, train, heldout)
    bench_cost(lm, profile, heldout[:4], args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
