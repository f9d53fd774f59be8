"""`pluristeer population build | fit | questions`: populations offline, on files (the service's routes do the
same through a worker: `service.api.populations`).

    pluristeer population build --data a.jsonl --data b.jsonl --data c.jsonl --out towns.population
    pluristeer population questions --population towns.population --data a.jsonl -k 20
    pluristeer population fit --population towns.population --data newcomer.jsonl --out newcomer.safetensors
    pluristeer eval --profile newcomer.safetensors@newcomer --data newcomer-judge.jsonl
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from service.cli.main import _eval_groups, _load_sample, _progress_bar
from steer_core.data import shared_questions
from steer_core.errors import SteerError

if TYPE_CHECKING:
    from steer_core.population import Population


def cmd_build(args: argparse.Namespace) -> int:
    groups = shared_questions(_eval_groups(args))  # bad input answers before torch loads
    from steer_core.models import load_model
    from steer_core.population_build import learn_population

    out = Path(args.out)
    lm = load_model(args.model)
    update, close = _progress_bar()
    start = time.perf_counter()
    try:
        population, report = learn_population(lm, groups, progress=update, seed=args.seed)
    finally:
        close()
    _write(out, population.to_bytes())
    print(f"population of {len(groups)} groups x {report['questions']} shared questions in "
          f"{time.perf_counter() - start:.0f} s -> {out}")
    print(f"question lean after block {report['lean_block']}; steering at block {report['vector_layer']}, strength "
          f"{report['strength']:g} (chat gain on {report['check_questions']} held-out questions, "
          f"{', '.join(report['check_groups'])}: "
          + ", ".join(f"{s} {g['mean']:+.4f} ± {g['standard_error']:.4f}"
                      for s, g in report["chat_gain_by_strength"].items()) + ")")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    items = _load_sample(args)
    population = _read_population(args.population)
    from steer_core.models import load_model
    from steer_core.population_build import fit_subject_profile

    lm = load_model(args.model)
    start = time.perf_counter()
    profile = fit_subject_profile(lm, population, items)
    seconds = time.perf_counter() - start
    profile.save(args.out)
    fitted = profile.metrics["population"]
    weights = ", ".join(f"{g} {w:.2f}" for g, w in sorted(fitted["weights"].items(), key=lambda x: -x[1])
                        if w >= 0.01)
    print(f"fitted from {len(items)} answers in {seconds:.1f} s -> {args.out}")
    print(f"weights: {weights}; temperature {fitted['temperature']:.2f}; steering strength {profile.strength:g}")
    m = profile.metrics
    print(f"in-sample alignment: unsteered {m['unsteered']['alignment']:.4f} -> served {m['steered']['alignment']:.4f}"
          " (judge it on other questions with `pluristeer eval`)")
    return 0


def cmd_questions(args: argparse.Namespace) -> int:
    items = _load_sample(args)
    population = _read_population(args.population)
    from steer_core.models import load_model
    from steer_core.population_build import next_questions

    lm = load_model(args.model)
    for rank, index in enumerate(next_questions(lm, population, items, args.k), start=1):
        item = items[index]
        print(f"{rank:3d}. [{item.id or index}] {item.question} ({' / '.join(item.options)})")
    return 0


def _read_population(path: str) -> Population:
    from steer_core.population import Population

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SteerError(f"cannot read {path}: {exc.strerror}", "population") from None
    return Population.from_bytes(data, source="population")


def _write(path: Path, data: bytes) -> None:
    """Atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
