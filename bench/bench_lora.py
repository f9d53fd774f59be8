"""LoRA profiles against COLD-FD and DiffMean on the default model (CPU): quality, build cost, serving cost.

    nice -n 10 .venv/bin/python bench/bench_lora.py [--threads 2] [--items 20] [--heldout 40] [--tokens 32]
                                                     [--reps 3] [--group Liberal] [--data DIR]
                                                     [--persona politically-liberal] [--skip-builds]

Everything is measured side by side in this one run; each timing is printed with the machine's load
average (`os.getloadavg()`, 1/5/15 min) and the process's CPU seconds beside the wall seconds. Targets
(issue 15):
1. throughput of 16 rows with 16 distinct LoRA adapters vs the same 16 rows unsteered, batched: >= 0.8x
   (the adapters are rank 8 on the targeted projections of the upper half, twice the rank and twice the
   blocks of what a build makes (rank 4, top quarter): serving cost grows with both, and an imported
   adapter may be that large; random factors: serving cost does not depend on the values);
2. the same 20 items (one OpinionsQA group of ../shared/data when present, else the repo's fixture) built
   with `lora`, `cold_fd` and `diffmean` (default params, each method's own cross-validated choice):
   build seconds, and held-out alignment gain over `calibrated` (the unsteered model through a temperature
   and ordinal lean fitted on the 20 build items) on other questions of the same group, in their survey
   option order, reversed, and both (each question's mean over the two orders, what the goal is judged on),
   with paired standard errors; beside them the COLD-FD profile exported as a peft adapter
   (`cold_fd_peft`, the low-rank update it steps along, scaled by its strength) and its paired
   difference to the COLD-FD profile itself; the project's goal "COLD-FD reaches >= 95% of LoRA's
   held-out gain at <= 1/10 of its build time" printed PASS or FAIL whichever way it comes out. The same
   again on 20 persona statements (`--persona`, a file of ../shared/data/persona, else the repo's fixture;
   "" skips it), judged on other statements of the same persona (one-hot Yes/No targets: one person's
   answers rather than a group's spread);
3. LoRA build from 20 items < 60 s; the adapter's size in bytes (stored tensors and the peft folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.engine.engine import GenerationEngine, PlannedProfile, SamplingParams, SteeringPlan  # noqa: E402
from steer_core import build_profile, load_items, load_model  # noqa: E402
from steer_core.calibration import fit_calibration, sample_alignment  # noqa: E402
from steer_core.data import load_opinionsqa, load_persona  # noqa: E402
from steer_core.evaluation import BOTH, ORDERS, evaluate_readings, paired_difference, read_orders  # noqa: E402
from steer_core.export import cold_fd_as_lora, peft_files  # noqa: E402
from steer_core.lora import PEFT_PREFIX, target_modules, target_names  # noqa: E402
from steer_core.profile import Profile  # noqa: E402
from steer_core.prompts import answer_distributions  # noqa: E402

RANK = 8

DEFAULT_DATA = REPO.parent / "shared" / "data" / "opinionsqa"
FIXTURE = REPO / "tests" / "fixtures" / "opinions_group_rural.jsonl"
PERSONA_FIXTURE = REPO / "tests" / "fixtures" / "persona_environmentalist.jsonl"


def opinion_items(data: Path, group: str) -> tuple[list, str]:
    waves = sorted(data.glob("American_Trends_Panel_W*"))
    if waves:  # every wave's questions (one wave holds about 20 for a group)
        items = list({it.id: it for wave in waves for it in load_opinionsqa(wave, "POLIDEOLOGY", group)}.values())
        source = f"OpinionsQA POLIDEOLOGY:{group}, {len(waves)} waves, {len(items)} questions"
    else:
        items, source = load_items(FIXTURE), f"{FIXTURE.name} ({data} absent)"
    random.Random(0).shuffle(items)
    return items, source


def persona_items(data: Path, name: str) -> tuple[list, str]:
    path = data.parent / "persona" / f"{name}.jsonl"
    if path.exists():
        items, source = load_persona(path), f"persona {name}"
    else:
        items, source = load_persona(PERSONA_FIXTURE), f"{PERSONA_FIXTURE.name} ({path} absent)"
    random.Random(0).shuffle(items)
    return items, f"{source}, {len(items)} statements"


def load() -> str:
    return "load avg " + "/".join(f"{x:.1f}" for x in os.getloadavg())


def random_adapters(lm, n: int, rank: int = RANK) -> list[Profile]:
    """n LoRA profiles with random factors (peft's tensor names, scaling alpha / r = 1)."""
    layer = lm.num_layers // 2
    modules = target_modules(lm, layer, target_names(lm))
    out = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for path, m in modules.items():
            out_f, in_f = m.weight.shape
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 1e-3
        out.append(Profile(method="lora", model_name=lm.name, model_fingerprint=lm.fingerprint, layer=layer,
                           positions="all", strength=1.0, tensors=tensors,
                           params={"adapter_config": {"r": rank, "lora_alpha": rank}}))
    return out


def throughput(lm, tokens: int, reps: int) -> None:
    print(f"\n== 16 rows, 16 distinct rank-{RANK} LoRA adapters vs 16 unsteered rows ({tokens} tokens each, "
          f"greedy; {load()}) ==")
    adapters = {f"adapter-{i}": p for i, p in enumerate(random_adapters(lm, 16))}  # names stand in for digests
    engine = GenerationEngine(lm, profiles=adapters.__getitem__, max_batch_size=16, batch_wait_ms=200,
                              max_new_tokens=tokens)
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    topics = ["rain", "trains", "farms", "taxes", "schools", "news", "gardens", "votes", "hospitals", "shops",
              "sports", "houses", "rivers", "music", "bread", "bikes"]
    prompts = [engine.tokenize_chat([{"role": "user", "content": f"Write about {t}."}]) for t in topics]

    def run(steering) -> float:
        start = time.perf_counter()
        handles = [engine.submit(p, sampling, s) for p, s in zip(prompts, steering, strict=True)]
        for h in handles:
            h.result(600)
        return 16 * tokens / (time.perf_counter() - start)

    try:
        run([None] * 16)  # warm-up
        ratios, plain_tps, lora_tps = [], [], []
        for _ in range(reps):
            plain = run([None] * 16)
            steered = run([SteeringPlan((PlannedProfile(name),)) for name in adapters])
            plain_tps.append(plain)
            lora_tps.append(steered)
            ratios.append(steered / plain)
        print(f"unsteered {statistics.median(plain_tps):.1f} tok/s, 16 LoRA rows {statistics.median(lora_tps):.1f} "
              f"tok/s; ratio (median of {reps} interleaved reps) {statistics.median(ratios):.3f} "
              f"[range {min(ratios):.3f}..{max(ratios):.3f}], target >= 0.8; largest batch "
              f"{engine.stats.largest_batch}; {load()}")
    finally:
        engine.stop()


def builds(lm, items, source: str, n_train: int, n_heldout: int, group: str) -> None:
    train, heldout = items[:n_train], items[n_train:n_train + n_heldout]
    print(f"\n== {n_train} build items, {len(heldout)} held-out questions: {source} ==")
    profiles, seconds = {}, {}
    for method in ("lora", "cold_fd", "diffmean"):
        wall, cpu = time.perf_counter(), time.process_time()
        profiles[method] = build_profile(lm, train, method)
        seconds[method] = time.perf_counter() - wall
        p = profiles[method]
        choice = {k: v for k, v in p.metrics["choice"].items() if k not in ("layer", "strength", "metric")}
        print(f"{method:9s} build {seconds[method]:7.1f} s wall, {time.process_time() - cpu:7.1f} s CPU ({load()}); "
              f"layer {p.layer} strength {p.strength:g} {choice or ''}; out-of-fold gain vs calibrated "
              f"{p.metrics['gain_vs_calibrated']['alignment']:+.4f} ± "
              f"{p.metrics['gain_vs_calibrated']['standard_error']:.4f}", flush=True)
    # The COLD-FD profile's update as the peft adapter a multi-LoRA server would serve (its calibration kept,
    # so the two differ only in steering vs weight update).
    profiles["cold_fd_peft"] = dataclasses.replace(cold_fd_as_lora(profiles["cold_fd"]),
                                                   calibration=profiles["cold_fd"].calibration)
    exported = [("cold_fd_peft", "cold_fd")]
    if profiles["cold_fd"].strength == 0:  # no-harm shipped no update: compare the export at the best candidate's
        best = max(profiles["cold_fd"].metrics["search"], key=lambda c: c.get("alignment", c.get("specificity")))
        profiles["cold_fd@best"] = dataclasses.replace(profiles["cold_fd"], strength=best["strength"])
        profiles["cold_fd@best_peft"] = dataclasses.replace(cold_fd_as_lora(profiles["cold_fd@best"]),
                                                            calibration=profiles["cold_fd"].calibration)
        exported.append(("cold_fd@best_peft", "cold_fd@best"))
        print(f"cold_fd shipped strength 0; also judged at its best out-of-fold candidate, strength "
              f"{best['strength']:g} (cold_fd@best), and that profile exported (cold_fd@best_peft)")
    calibration = fit_calibration(train, answer_distributions(lm, train))
    # Both option orders: a profile that learned letter positions, not opinions, loses in the reversed one.
    readings = {name: read_orders(lm, heldout, p, ORDERS) for name, p in profiles.items()}
    report = evaluate_readings({group: heldout}, read_orders(lm, heldout, None, ORDERS), readings,
                               own={m: group for m in profiles}, calibrations={group: calibration})
    gains = {}
    print("held-out alignment (mean over questions) and (gain over calibrated ± paired SE) in the survey order, "
          "the reversed order, and both (each question's mean over the two: what the goal is judged on):")
    for row in ("unsteered", "uniform", "calibrated", *profiles):
        line = []
        for order in (*ORDERS, BOTH):
            c = report["cells"][order][row][group]
            g = c["gain_vs_calibrated"]
            line.append(f"{c['alignment']['mean']:.4f} ({g['mean']:+.4f} ± {g['standard_error']:.4f})")
        gains[row] = report["cells"][BOTH][row][group]["gain_vs_calibrated"]["mean"]
        print(f"  {row:17s} " + "   ".join(line))
    over_uniform = {name: report["cells"][BOTH][name][group]["gain_vs_uniform"] for name in profiles}
    print("gain over uniform (both orders, paired SE; more than flattening when > 0): " + ", ".join(
        f"{name} {g['mean']:+.4f} ± {g['standard_error']:.4f}" for name, g in over_uniform.items()))

    def pooled(name: str) -> list[float]:
        """Each question's alignment averaged over the two orders."""
        by_order = [sample_alignment(heldout, readings[name][order]) for order in ORDERS]
        return [sum(values) / len(values) for values in zip(*by_order, strict=True)]

    def paired(a: str, b: str) -> str:
        d = paired_difference(pooled(a), pooled(b))
        return f"{d.mean:+.4f} ± {d.standard_error:.4f} (both orders)"

    for adapter, profile in exported:
        print(f"{adapter} - {profile} (the exported adapter vs the COLD profile itself): {paired(adapter, profile)}")
    print(f"cold_fd - lora: {paired('cold_fd', 'lora')}")
    lora, cold = gains["lora"], gains["cold_fd"]
    time_ratio = seconds["cold_fd"] / seconds["lora"]
    if lora > 0:
        share = cold / lora
        verdict = "PASS" if share >= 0.95 and time_ratio <= 0.1 else "FAIL"
        detail = f"COLD-FD gain / LoRA gain = {share:.2f}"
    else:
        verdict = "FAIL"
        detail = f"COLD-FD gain / LoRA gain undefined (LoRA's held-out gain {lora:+.4f} <= 0; COLD-FD's {cold:+.4f})"
    print(f"COLD-FD reaches >= 95% of LoRA's held-out gain at <= 1/10 of its build time: {verdict} ({detail}; "
          f"build time ratio {time_ratio:.2f})")
    files = peft_files(profiles["lora"])
    print(f"LoRA build {seconds['lora']:.1f} s (target < 60 s): {'PASS' if seconds['lora'] < 60 else 'FAIL'}; "
          f"adapter {profiles['lora'].nbytes()} bytes of tensors, peft folder "
          f"{sum(len(v) for v in files.values())} bytes ({load()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--heldout", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--group", default="Liberal")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the OpinionsQA folder")
    parser.add_argument("--persona", default="politically-liberal", help="persona statements beside it (\"\": none)")
    parser.add_argument("--skip-builds", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}, os.cpu_count() {os.cpu_count()}, {load()}")
    lm = load_model()
    throughput(lm, args.tokens, args.reps)
    if not args.skip_builds:
        items, source = opinion_items(args.data, args.group)
        builds(lm, items, source, args.items, args.heldout, args.group)
        if args.persona:
            items, source = persona_items(args.data, args.persona)
            builds(lm, items, source, args.items, args.heldout, args.persona)


if __name__ == "__main__":
    main()
