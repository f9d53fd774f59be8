"""`pluristeer`: the command line.

Every command imports what it needs when it runs (torch, transformers, Flask, Celery take seconds to
load), so `--help` and argument errors answer at once and `pluristeer eval` never loads Flask or Celery.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from steer_core.defaults import DEFAULT_MODEL
from steer_core.errors import SteerError

# What each registered method does, for `--help` (tests hold this list equal to steer_core's registry).
METHOD_HELP = {
    "diffmean": "DiffMean (CAA), the baseline: the mean activation of the group's answers minus that of the "
                "other answers, added at one layer (one constant vector)",
    "cold_kernel": "COLD-Steer, kernel form (COLD-Kernel): the loss gradient with respect to the layer's "
                   "activations, averaged over the sample, added against the gradient (unit kernel: one "
                   "constant vector)",
    "cold_fd": "COLD-Steer, finite-difference form (COLD-FD): one gradient step on the weights up to the "
               "layer, seen through how it moves that layer's activations; input-dependent, costs one extra "
               "pass through those layers per request",
    "odesteer": "ODESteer: a barrier function fitted on sketched activations; steering follows its gradient "
                "flow (an ODE) at the last position",
    "lora": "LoRA: a peft low-rank adapter trained on the sample with COLD-Steer's losses (a fine-tuning "
            "baseline; positions all), served per row without merging weights",
}
# Fields of the interchange format a table's columns can be mapped to (--question-column ...).
COLUMN_ROLES = ("question", "options", "target", "answer", "ordinal", "id")
POSITIONS_HELP = ("where the displacement is added: prompt = every prompt token (the default of most methods), "
                  "last = the last prompt token and every generated token, all = every token")
MODEL_HELP = (f"base model: {DEFAULT_MODEL} (the embedded default, fetched once), a Hugging Face hub id, a local "
              "directory or a .gguf file")


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """A handler imported only when its command runs ("module:function")."""

    def run(args: argparse.Namespace) -> int:
        module, name = target.split(":")
        return int(getattr(importlib.import_module(module), name)(args) or 0)

    return run


# ---------------------------------------------------------------------------------------------- offline


def cmd_model_fetch(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from steer_core.models import fetch_default_model, load_model

    transformers_logging.disable_progress_bar()  # one line of result, not a weight-loading bar
    start = time.perf_counter()
    path = fetch_default_model()
    lm = load_model(args.model)
    print(f"{lm.name}: {lm.num_layers} layers, hidden {lm.hidden_size}, fingerprint {lm.fingerprint}")
    print(f"cached at {path} (ready in {time.perf_counter() - start:.1f} s)")
    return 0


def _load_sample(args: argparse.Namespace, data: str | None = None, group: str | None = None) -> list:
    """The items of `--data` (or `data`) for `--group` (or `group`), after --offset/--limit."""
    from steer_core.data import load_items

    columns = None
    if any(getattr(args, f"{role}_column") for role in COLUMN_ROLES):
        from steer_core.tables import Columns

        columns = Columns(**{role: getattr(args, f"{role}_column") or role for role in COLUMN_ROLES})
    items = load_items(data or args.data, args.format, group or args.group, columns=columns, split=args.split)
    if args.limit:
        items = items[args.offset:args.offset + args.limit]
    elif args.offset:
        items = items[args.offset:]
    if not items:
        raise SteerError("no items left after --offset/--limit", "data")
    return items


def _with_contrast(items: list, paths: Sequence[str]) -> list:
    """`items`, each carrying the pooled answers of the contrast groups (`--contrast`, a file each, each group
    counting once) on the same question (text and options), as the service's contrast does
    (`steer_core.data.with_contrast`); a file that answers none of the sample's questions is refused."""
    from steer_core.data import load_items, question_key, with_contrast

    wanted = {question_key(it) for it in items}
    others = []
    for path in paths:
        sample = load_items(path)
        if not any(question_key(it) in wanted for it in sample):
            raise SteerError(f"{path} answers none of the sample's questions (same text and options): there is "
                             "nothing to tell apart", "contrast")
        others.append(sample)
    return with_contrast(items, others)


def _progress_bar(total_hint: int = 1) -> tuple[Callable[[int, int, str], None], Callable[[], None]]:
    from tqdm import tqdm

    bar = tqdm(total=total_hint, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(done: int, total: int, stage: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_description(stage)
        bar.refresh()

    return update, bar.close


def _parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SteerError(f"expected KEY=VALUE, got {pair!r}", "param")
        key, raw = pair.split("=", 1)
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def describe_calibration(profile: Any) -> str:
    """A profile's output calibration in words (its lean read off each question when it has a question lean)."""
    text = f"calibration T {profile.calibration.temperature:g}"
    if profile.question_lean is not None:
        return text + f", lean read off the question (block {profile.question_lean.layer})"
    return text + f" lean {profile.calibration.lean:g}"


def cmd_build(args: argparse.Namespace) -> int:
    items = _load_sample(args)  # bad input answers before torch loads
    if args.contrast:
        items = _with_contrast(items, args.contrast)
    params = _parse_params(args.param)
    for key in ("layer", "strength", "positions"):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    from steer_core.build import build_profile
    from steer_core.models import load_model

    out = Path(args.out)
    lm = load_model(args.model)
    update, close = _progress_bar()
    start = time.perf_counter()
    try:
        profile = build_profile(lm, items, args.method, params, progress=update)
    finally:
        close()
    profile.save(out)  # atomic: nothing is written unless the build succeeded
    m = profile.metrics
    print(f"{args.method} profile from {len(items)} items in {time.perf_counter() - start:.1f} s -> {out} "
          f"({out.stat().st_size / 1e6:.2f} MB)")
    print(f"layer {profile.layer}, strength {profile.strength:g}, positions {profile.positions}; "
          f"{describe_calibration(profile)}")
    print(f"{m['evaluation']} alignment: unsteered {m['unsteered']['alignment']:.4f} -> "
          f"steered {m['steered']['alignment']:.4f}")
    gain = dict(m.get("gain") or {})
    error = gain.pop("standard_error", None)
    for metric, value in gain.items():
        print(f"best setting's out-of-fold gain in {metric}: {value:+.4f} ± {error:.4f} "
              "(± one standard error; read the two together)")
    if "calibrated" in m:
        over = m["gain_vs_calibrated"]
        print(f"baselines: uniform {m['uniform']['alignment']:.4f}, calibrated {m['calibrated']['alignment']:.4f}; "
              f"best setting vs calibrated {over['alignment']:+.4f} ± {over['standard_error']:.4f}")
    lean = m.get("question_lean")
    if lean and "gain_vs_calibration" in lean:
        over = lean["gain_vs_calibration"]
        print(f"question lean {'shipped' if lean['shipped'] else 'not shipped'}: out of fold "
              f"{over['alignment']:+.4f} ± {over['standard_error']:.4f} over the plain calibration")
    elif lean:
        print(f"question lean not considered: {lean['note']}")
    if m.get("note"):
        print(m["note"])
    if "verdict" in m:
        print(f"verdict: {m['verdict']['summary']}")
    chat = (m.get("generation") or {}).get("gain_vs_unsteered")
    if chat:
        print(f"what chat gets (the steering alone, one option order at a time): {chat['mean']:+.4f} ± "
              f"{chat['standard_error']:.4f} over unsteered")
    return 0


def _eval_groups(args: argparse.Namespace) -> dict[str, list]:
    """Each target group's items: one group per `--data` file, or one per `--group` of one OpinionsQA wave."""
    if len(args.data) > 1 and args.group:
        raise SteerError("give several --data files (a group each) or one --data with several --group", "group")
    if len(args.data) > 1:
        sources = [(d, None) for d in args.data]
    else:
        sources = [(args.data[0], g) for g in args.group or [None]]
    groups: dict[str, list] = {}
    for path, group in sources:
        name = group.split(":", 1)[-1] if group else Path(path).stem
        if name in groups:
            raise SteerError(f"two targets are both named {name!r}", "data")
        groups[name] = _load_sample(args, path, group)
    return groups


def _eval_profiles(specs: Sequence[str], groups: dict[str, list]) -> list[tuple[str, str, str | None]]:
    """(name, path, own group) of each `--profile PATH[@GROUP]`."""
    out: list[tuple[str, str, str | None]] = []
    for spec in specs:
        path, own = spec, None
        if "@" in spec and "/" not in spec.rsplit("@", 1)[1]:
            path, own = spec.rsplit("@", 1)
            if own not in groups:
                raise SteerError(f"{own!r} is not one of the targets ({', '.join(groups)})", "profile")
        taken = {n for n, _, _ in out}
        name, k = Path(path).stem, 1
        while name in taken:  # the same file twice, or two files of one name
            k += 1
            name = f"{Path(path).stem}#{k}"
        out.append((name, path, own))
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    groups = _eval_groups(args)  # bad input answers before torch loads
    specs = _eval_profiles(args.profile, groups)
    from steer_core.evaluation import evaluate, format_cross_table
    from steer_core.folds import MIN_HELDOUT, MIN_TRAIN
    from steer_core.models import load_model
    from steer_core.profile import Profile

    n = len(next(iter(groups.values())))
    if n < MIN_HELDOUT + MIN_TRAIN:
        raise SteerError(f"{n} questions are too few: the calibrated baseline is fitted out of fold and needs at "
                         f"least {MIN_HELDOUT + MIN_TRAIN}", "data")
    lm = load_model(args.model)
    profiles = {name: Profile.load(path, lm) for name, path, _ in specs}
    try:
        report = evaluate(lm, groups, profiles, own={name: own for name, _, own in specs}, seed=args.seed,
                          debiased=not args.single_order)
    except ValueError as exc:
        if isinstance(exc, SteerError):
            raise
        raise SteerError(str(exc), "data") from None
    if args.json:
        json.dump(report, sys.stdout)
        print()
        return 0
    for name, p in profiles.items():
        own = report["profiles"][name]["own_group"]
        print(f"{name}: {p.method} layer {p.layer} strength {p.strength:g}, {describe_calibration(p)}"
              + (f", built for {own}" if own else ""))
    if report["debiased"]:
        # Every question read in both option orders and averaged: the orders cannot differ, one table says all.
        print("\ndebiased reads (each question read in both option orders, averaged; --single-order reads each "
              "order on its own)")
        print(format_cross_table(report, report["orders"][-1]))
        return 0
    for order in report["orders"]:
        print()
        print(format_cross_table(report, order))
    return 0


# ---------------------------------------------------------------------------------------------- parser


def _add_sample_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    """The sample's arguments; `several`: repeatable --data (a group each, the same questions) and --group."""
    from steer_core.data import FORMATS  # stdlib only: cheap

    p.add_argument("--data", required=True, action="append" if several else "store",
                   help="items file (JSONL, CSV, Parquet), a saved Hugging Face dataset or OpinionsQA wave "
                        "directory, or with --format hf a hub dataset name (downloaded: needs the network)"
                        + ("; repeat for several groups' files on the same questions" if several else ""))
    p.add_argument("--format", choices=FORMATS, help="default: guessed from the file")
    for role in COLUMN_ROLES:
        p.add_argument(f"--{role}-column", metavar="NAME",
                       help=f"the table column holding each item's {role} (default: {role})")
    p.add_argument("--split", default="train", help="the split of a Hugging Face dataset (default: train)")
    p.add_argument("--group", action="append" if several else "store",
                   help="OpinionsQA group as ATTRIBUTE:Group, e.g. POLIDEOLOGY:Liberal"
                        + (" (repeat)" if several else ""))
    p.add_argument("--offset", type=int, default=0, help="skip this many items first")
    p.add_argument("--limit", type=int, default=0, help="use at most this many items")


def _methods_epilog() -> str:
    import textwrap

    return "methods:\n" + "\n".join(textwrap.fill(text, 100, initial_indent=f"  {name:<13}", subsequent_indent=" " * 15)
                                     for name, text in METHOD_HELP.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pluristeer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="manage the base model").add_subparsers(dest="action", required=True)
    fetch = model.add_parser("fetch", help="fetch and cache the default model")
    fetch.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    fetch.set_defaults(func=cmd_model_fetch)

    build = sub.add_parser("build", help="build a profile offline from a file of opinion items",
                           epilog=_methods_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--method", required=True, choices=list(METHOD_HELP), help="steering method (below)")
    _add_sample_args(build)
    build.add_argument("--out", required=True, help="profile file to write (.safetensors)")
    build.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    build.add_argument("--layer", type=int, help="fix the layer (default: chosen on held-out items)")
    build.add_argument("--strength", type=float, help="fix the strength (default: chosen on held-out items)")
    build.add_argument("--positions", choices=("prompt", "last", "all"), help=POSITIONS_HELP)
    build.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="a method parameter, e.g. --param rank=8 (JSON values)")
    build.add_argument("--contrast", action="append", default=[], metavar="FILE",
                       help="items file (JSONL) of a group to tell the sample apart from: its answers to the same "
                            "questions (matched by text and options); the build then chooses by specificity. "
                            "Repeat for several groups")
    build.set_defaults(func=cmd_build)

    ev = sub.add_parser("eval", help="profiles against groups on the same questions, beside the unsteered, "
                        "uniform and calibrated baselines, in both option orders")
    ev.add_argument("--profile", action="append", default=[], metavar="PATH[@GROUP]",
                    help="profile file, optionally with the target group it was built for (repeat)")
    _add_sample_args(ev, several=True)
    ev.add_argument("--seed", type=int, default=0, help="folds of the calibrated baseline")
    ev.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ev.add_argument("--single-order", action="store_true",
                    help="read each option order on its own (what chat sees) instead of both orders averaged "
                         "(the default, as /v1/score reads; twice the reads)")
    ev.set_defaults(func=cmd_eval)

    population = sub.add_parser("population", help="populations: learn one from groups that answered the same "
                                "questions, fit a subject against it, rank the questions to ask first"
                                ).add_subparsers(dest="action", required=True)
    learn = population.add_parser("build", help="learn a population from groups' files on the same questions")
    _add_sample_args(learn, several=True)
    learn.add_argument("--out", required=True, help="population file to write (safetensors)")
    learn.add_argument("--seed", type=int, default=0, help="which questions check the steering strength")
    learn.set_defaults(func=_lazy("service.cli.population:cmd_build"))
    fit = population.add_parser("fit", help="a subject's profile from its answers, fitted against a population "
                                "(no backward pass; seconds)")
    _add_sample_args(fit)
    fit.add_argument("--out", required=True, help="profile file to write (.safetensors)")
    ask = population.add_parser("questions", help="rank questions by how much a new subject's answer tells")
    _add_sample_args(ask)
    ask.add_argument("-k", type=int, default=20, help="how many (default 20)")
    fit.set_defaults(func=_lazy("service.cli.population:cmd_fit"))
    ask.set_defaults(func=_lazy("service.cli.population:cmd_questions"))
    for p in (learn, fit, ask):
        if p is not learn:
            p.add_argument("--population", required=True, help="population file (`pluristeer population build`)")
        p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)

    up = sub.add_parser("up", help="run the whole stack on this machine (embedded defaults)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--workers", type=int, default=1, help="API worker processes")
    up.add_argument("--build-workers", type=int, default=1, help="concurrency of the build worker")
    up.add_argument("--queues", help="queues the build worker listens on (default: gpu,cpu on a GPU host, else cpu)")
    up.add_argument("--access-log", action="store_true",
                    help="log every HTTP request (off by default here; `serve` always logs them)")
    up.set_defaults(func=_lazy("service.cli.stack:run_up"))

    serve = sub.add_parser("serve", help="run the API under a production WSGI server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(func=_lazy("service.cli.stack:serve"))

    worker = sub.add_parser("worker", help="run a Celery worker for profile builds")
    worker.add_argument("--queues", help="comma-separated queues (default: gpu,cpu on a GPU host, else cpu)")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--hostname", help="Celery node name")
    worker.set_defaults(func=_lazy("worker.app:run_worker"))

    db = sub.add_parser("db", help="database").add_subparsers(dest="action", required=True)
    upgrade = db.add_parser("upgrade", help="apply migrations up to the newest")
    upgrade.add_argument("--database-url", help="default: DATABASE_URL or the embedded SQLite file")
    upgrade.set_defaults(func=_lazy("service.store.db:upgrade_cli"))

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="create a key for a tenant (printed once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", help="what the key is for (shown by `keys list`)")
    create.add_argument("--database-url", help="default: DATABASE_URL or the embedded SQLite file")
    create.set_defaults(func=_lazy("service.auth:create_key_cli"))
    listing = keys.add_parser("list", help="list keys by prefix (no secrets)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.add_argument("--database-url", help="default: DATABASE_URL or the embedded SQLite file")
    listing.set_defaults(func=_lazy("service.auth:list_keys_cli"))
    revoke = keys.add_parser("revoke", help="revoke a key by its prefix (it gets 401 at once)")
    revoke.add_argument("prefix", help="the key's prefix, as `keys list` shows it")
    revoke.add_argument("--database-url", help="default: DATABASE_URL or the embedded SQLite file")
    revoke.set_defaults(func=_lazy("service.auth:revoke_key_cli"))

    demo = sub.add_parser("demo", help="walk through the service against a running server")
    demo.add_argument("--url", help="server URL (default: the one `pluristeer up` wrote)")
    demo.add_argument("--key", help="API key (default: the one `pluristeer up` wrote)")
    demo.add_argument("--items", type=int, default=16, help="opinion items to post for the demo group")
    demo.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the build")
    demo.add_argument("--skip-ab", action="store_true", help="skip the A/B experiment part")
    demo.add_argument("--no-builds", action="store_true",
                      help="only the group and one unsteered chat: a quick check that the stack answers")
    demo.set_defaults(func=_lazy("service.cli.demo:main"))

    bench = sub.add_parser("bench", help="run a benchmark script from bench/")
    bench.add_argument("name", help="script name, e.g. bench_cold")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    script = Path(__file__).resolve().parents[2] / "bench" / f"{args.name.removesuffix('.py')}.py"
    if not script.exists():
        raise SteerError(f"no benchmark {script.name} in bench/", "name")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SteerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
