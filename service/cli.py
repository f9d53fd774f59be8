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


def _load_sample(args: argparse.Namespace) -> list:
    from steer_core.data import load_items

    columns = None
    if any(getattr(args, f"{role}_column") for role in COLUMN_ROLES):
        from steer_core.tables import Columns

        columns = Columns(**{role: getattr(args, f"{role}_column") or role for role in COLUMN_ROLES})
    items = load_items(args.data, args.format, args.group, columns=columns, split=args.split)
    if args.limit:
        items = items[args.offset:args.offset + args.limit]
    elif args.offset:
        items = items[args.offset:]
    if not items:
        raise SteerError("no items left after --offset/--limit", "data")
    return items


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


def cmd_build(args: argparse.Namespace) -> int:
    items = _load_sample(args)  # bad input answers before torch loads
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
    print(f"layer {profile.layer}, strength {profile.strength:g}, positions {profile.positions}")
    print(f"{m['evaluation']} alignment: unsteered {m['unsteered']['alignment']:.4f} -> "
          f"steered {m['steered']['alignment']:.4f}")
    gain = dict(m.get("gain") or {})
    error = gain.pop("standard_error", None)
    for metric, value in gain.items():
        print(f"best setting's out-of-fold gain in {metric}: {value:+.4f} ± {error:.4f} "
              "(± one standard error; read the two together)")
    if m.get("note"):
        print(m["note"])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    items = _load_sample(args)  # bad input answers before torch loads
    from steer_core.methods import intervention
    from steer_core.metrics import summarize
    from steer_core.models import load_model
    from steer_core.profile import Profile
    from steer_core.prompts import answer_distributions

    lm = load_model(args.model)
    profiles = [(Path(p).stem, Profile.load(p, lm)) for p in args.profile]
    columns: dict[str, list] = {}
    update, close = _progress_bar()
    try:
        runs = [("unsteered", None)] + [(name, [intervention(p, lm)]) for name, p in profiles]
        for i, (name, steering) in enumerate(runs):
            columns[name] = answer_distributions(
                lm, items, steering, progress=lambda d, t, i=i, n=name: update(i * t + d, len(runs) * t, n))
    finally:
        close()
    summary = {name: summarize(items, dists) for name, dists in columns.items()}
    if args.json:
        names = list(columns)
        report = {
            "summary": summary,
            "profiles": {name: {"method": p.method, "layer": p.layer, "strength": p.strength} for name, p in profiles},
            "items": [{"id": it.id, "target": list(it.target),
                       **{name: [round(float(x), 6) for x in columns[name][k]] for name in names}}
                      for k, it in enumerate(items)],
        }
        if len(profiles) == 1:  # the documented shape for one profile: "steered"
            report["summary"]["steered"] = report["summary"].pop(profiles[0][0])
            for row in report["items"]:
                row["steered"] = row.pop(profiles[0][0])
        json.dump(report, sys.stdout)
        print()
        return 0
    _print_table(summary, len(items), profiles)
    return 0


def _print_table(summary: dict[str, dict[str, float]], n_items: int, profiles: list) -> None:
    metrics = list(next(iter(summary.values())))
    names = list(summary)
    width = max(12, *(len(n) for n in names))
    print(f"{n_items} items; " + "; ".join(f"{n}: {p.method} layer {p.layer} strength {p.strength:g}"
                                          for n, p in profiles))
    print(f"{'metric':<16}" + "".join(f"{n:>{width + 2}}" for n in names))
    for metric in metrics:
        arrow = "(lower is better)" if metric in ("total_variation", "kl") else ""
        print(f"{metric:<16}" + "".join(f"{summary[n][metric]:>{width + 2}.4f}" for n in names) + f"  {arrow}")


# ---------------------------------------------------------------------------------------------- parser


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    from steer_core.data import FORMATS  # stdlib only: cheap

    p.add_argument("--data", required=True,
                   help="items file (JSONL, CSV, Parquet), a saved Hugging Face dataset or OpinionsQA wave "
                        "directory, or with --format hf a hub dataset name (downloaded: needs the network)")
    p.add_argument("--format", choices=FORMATS, help="default: guessed from the file")
    for role in COLUMN_ROLES:
        p.add_argument(f"--{role}-column", metavar="NAME",
                       help=f"the table column holding each item's {role} (default: {role})")
    p.add_argument("--split", default="train", help="the split of a Hugging Face dataset (default: train)")
    p.add_argument("--group", help="OpinionsQA group as ATTRIBUTE:Group, e.g. POLIDEOLOGY:Liberal")
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
    build.set_defaults(func=cmd_build)

    ev = sub.add_parser("eval", help="unsteered vs steered on a file's items, side by side")
    ev.add_argument("--profile", action="append", default=[], help="profile file (repeat to compare methods)")
    _add_sample_args(ev)
    ev.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ev.set_defaults(func=cmd_eval)

    up = sub.add_parser("up", help="run the whole stack on this machine (embedded defaults)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--workers", type=int, default=1, help="API worker processes")
    up.add_argument("--build-workers", type=int, default=1, help="concurrency of the build worker")
    up.add_argument("--queues", help="queues the build worker listens on (default: gpu,cpu on a GPU host, else cpu)")
    up.set_defaults(func=_lazy("service.stack:run_up"))

    serve = sub.add_parser("serve", help="run the API under a production WSGI server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(func=_lazy("service.stack:serve"))

    worker = sub.add_parser("worker", help="run a Celery worker for profile builds")
    worker.add_argument("--queues", help="comma-separated queues (default: gpu,cpu on a GPU host, else cpu)")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--hostname", help="Celery node name")
    worker.set_defaults(func=_lazy("worker.app:run_worker"))

    db = sub.add_parser("db", help="database").add_subparsers(dest="action", required=True)
    upgrade = db.add_parser("upgrade", help="apply migrations up to the newest")
    upgrade.add_argument("--database-url", help="default: DATABASE_URL or the embedded SQLite file")
    upgrade.set_defaults(func=_lazy("service.db:upgrade_cli"))

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
    demo.set_defaults(func=_lazy("service.demo:main"))

    bench = sub.add_parser("bench", help="run a benchmark script from bench/")
    bench.add_argument("name", help="script name, e.g. bench_cold")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    script = Path(__file__).resolve().parent.parent / "bench" / f"{args.name.removesuffix('.py')}.py"
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
