"""How long a subject fit against a population takes through the API, worker included (issue 28's cost target:
p95 5 s or less from 20 answers).

    .venv/bin/python bench/population_fit_api.py [--data DIR] [--attribute POLIDEOLOGY] [--subject Liberal]
        [--build-questions 24] [--subjects 20] [--answers 20] [--port 8765]

Starts `pluristeer up` on a fresh temporary home (embedded Redis, SQLite, one build worker, the API), puts the
groups of `--attribute` except `--subject` over `--build-questions` shared questions, learns a population from
them through `POST /v1/populations`, then fits `--subjects` simulated people of the left-out group (one answer
per question, drawn from the group's distributions), alternating two kinds side by side:

- `asked`: people who answered the `--answers` questions the population suggests
  (`GET /v1/populations/{id}/questions`), the service's own flow; the population kept its unsteered reads of
  them, so the fit reads them once, steered;
- `new`: people who answered `--answers` questions of other waves, which the population never read.

Each: `PUT /v1/users/{uid}`, `POST .../opinions`, and `POST /v1/profiles` with method `population`, timed from
that POST until `GET /v1/profiles/{id}` says ready (polled every 200 ms). Side by side in the same run: the
same fits in this process with the model already loaded (`fit_subject_profile`), so the service's share of
the time (queue, worker claim, store, cache) is the difference; and each fit's time in the worker as Celery
logged it. The population's size matters little to a fit: its cost is the subject's own reads.

Exits with a message (status 0) when the data directory is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.population import DEFAULT_DATA, load_groups, pick, simulated_person, split_by_wave  # noqa: E402
from service.cli.demo_ab import Client  # noqa: E402
from steer_core.data import OpinionItem  # noqa: E402

JUDGE_WAVES = {"W43", "W45", "W49", "W50"}


def start_stack(home: Path, port: int) -> tuple[subprocess.Popen[bytes], Client]:
    env = {**os.environ, "PLURISTEER_HOME": str(home)}
    env.pop("REDIS_URL", None)
    env.pop("DATABASE_URL", None)
    log = open(home / "up.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    up_file = home / "up.json"
    deadline = time.monotonic() + 300
    while not up_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"`pluristeer up` did not start; its log: {home / 'up.log'}")
        time.sleep(0.5)
    saved = json.loads(up_file.read_text())
    api = Client(saved["url"], saved["key"], timeout=300)
    while api.call("GET", "/readyz", ok=(200, 503)).get("status") != "ready":
        if time.monotonic() > deadline + 600:
            raise SystemExit("the API's model did not load in 15 min")
        time.sleep(1)
    return proc, api


def stop_stack(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_status(api: Client, path: str, timeout: float, poll: float) -> tuple[dict[str, Any], float]:
    """The resource once it is ready (or failed), and the seconds it took from the call."""
    start = time.perf_counter()
    while True:
        doc = api.call("GET", path)
        if doc["status"] in ("ready", "failed"):
            return doc, time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise SystemExit(f"{path} still {doc['status']} after {timeout:.0f} s")
        time.sleep(poll)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--attribute", default="POLIDEOLOGY")
    parser.add_argument("--subject", default="Liberal", help="the group left out; its people are the subjects")
    parser.add_argument("--build-questions", type=int, default=24)
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--answers", type=int, default=20)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"skipped: {args.data} is not present (OpinionsQA data is not shipped with the repo)")
        return 0
    groups, waves = load_groups(args.data, [args.attribute])
    left_out = f"{args.attribute}:{args.subject}"
    if left_out not in groups:
        raise SystemExit(f"--subject: no group {left_out!r}; groups: {', '.join(sorted(groups))}")
    build_idx, judge_idx = split_by_wave(waves, JUDGE_WAVES, args.build_questions, args.answers)
    if len(build_idx) < args.answers:
        raise SystemExit(f"--build-questions: the population needs at least --answers ({args.answers}) questions")
    rng = np.random.default_rng(0)
    by_id = {it.id: it for it in groups[left_out]}

    with tempfile.TemporaryDirectory(prefix="pluristeer-fit-bench-") as tmp:
        proc, api = start_stack(Path(tmp), args.port)
        try:
            basis = {g: pick(items, build_idx) for g, items in groups.items() if g != left_out}
            for g, items in basis.items():
                gid = g.split(":", 1)[1].lower().replace(" ", "-")
                api.call("PUT", f"/v1/groups/{gid}", {"members": []})
                api.call("POST", f"/v1/groups/{gid}/opinions", {"items": [it.to_json() for it in items]})
            created = api.call("POST", "/v1/populations", {"name": args.attribute.lower()})
            population, build_s = wait_status(api, f"/v1/populations/{created['id']}", 3600, 1.0)
            if population["status"] != "ready":
                raise SystemExit(f"the population failed: {population.get('error')}")
            print(f"population of {len(basis)} groups x {population['questions']} questions learned through the "
                  f"API in {build_s:.0f} s; strength {population['report'].get('strength')}", flush=True)
            suggested = api.call("GET", f"/v1/populations/{created['id']}/questions?k={args.answers}")["questions"]
            asked = [by_id[q["id"]] for q in suggested]
            people = [(kind, simulated_person(questions, rng)) for _ in range(0, args.subjects, 2)
                      for kind, questions in (("asked", asked), ("new", pick(groups[left_out], judge_idx)))]
            people = people[:args.subjects]

            api_s: dict[str, list[float]] = {"asked": [], "new": []}
            for i, (kind, answers) in enumerate(people):
                uid = f"person-{i}-{uuid.uuid4().hex[:6]}"
                api.call("PUT", f"/v1/users/{uid}", {})
                api.call("POST", f"/v1/users/{uid}/opinions", {"items": [it.to_json() for it in answers]})
                start = time.perf_counter()
                made = api.call("POST", "/v1/profiles", {"subject": {"kind": "user", "id": uid},
                                                         "method": "population",
                                                         "params": {"population": created["id"]}})
                # Polled 5 times a second: under the key's rate limit (RATE_LIMIT_PER_MINUTE, 600), whose 429 and
                # Retry-After would add their wait to the fit's.
                profile, _ = wait_status(api, f"/v1/profiles/{made['id']}", 600, 0.2)
                api_s[kind].append(time.perf_counter() - start)
                if profile["status"] != "ready":
                    raise SystemExit(f"a subject fit failed: {profile.get('error')}")
                print(f"  {uid} ({kind}): through the API {api_s[kind][-1]:.2f} s", flush=True)
            # The population's file, from the home's content-addressed store (the API serves no download).
            artifact = next(Path(tmp).rglob(population["artifact"]["sha256"])).read_bytes()
        finally:
            stop_stack(proc)
        # The worker's own time for each fit (Celery's "succeeded in"), to tell a slow fit from a slow service.
        logged = [float(m) for m in re.findall(r"build_profile\[[^]]+\] succeeded in ([0-9.]+)s",
                                                (Path(tmp) / "up.log").read_text(errors="replace"))]

    task_s: dict[str, list[float]] = {"asked": [], "new": []}
    if len(logged) == len(people):
        for (kind, _), seconds in zip(people, logged, strict=True):
            task_s[kind].append(seconds)
    in_process_s = fit_in_process(people, artifact)
    print(f"\nsubject fit from {args.answers} answers, {len(people)} subjects, this machine "
          f"({os.cpu_count()} cores, shared):")
    for kind, what in (("asked", "the questions the population suggests"), ("new", "questions it never read")):
        if not api_s[kind]:
            continue
        print(f" {kind} ({what}):")
        print(f"  through the API (POST to ready): {_stats(api_s[kind])}")
        if task_s[kind]:
            print(f"  the worker's task alone:          {_stats(task_s[kind])} "
                  f"(each fit: {', '.join(f'{t:.1f}' for t in task_s[kind])})")
        print(f"  in this process, model loaded:   {_stats(in_process_s[kind])}")
        print(f"  the service's share (median difference): "
              f"{np.median(api_s[kind]) - np.median(in_process_s[kind]):+.2f} s")
        print(f"  target (issue 28): p95 through the API <= 5 s: "
              f"{'PASS' if np.percentile(api_s[kind], 95) <= 5 else 'FAIL'}")
    return 0


def _stats(seconds: list[float]) -> str:
    return f"median {np.median(seconds):.2f} s, p95 {np.percentile(seconds, 95):.2f} s"


def fit_in_process(people: list[tuple[str, list[OpinionItem]]], artifact: bytes) -> dict[str, list[float]]:
    """The same fits with the model loaded here, by kind."""
    from steer_core import load_model
    from steer_core.population import Population
    from steer_core.population_build import fit_subject_profile

    lm = load_model()
    population = Population.from_bytes(artifact)
    fit_subject_profile(lm, population, people[0][1])  # warm-up, as the worker's first fit is not timed apart
    out: dict[str, list[float]] = {"asked": [], "new": []}
    for kind, answers in people:
        start = time.perf_counter()
        fit_subject_profile(lm, population, answers)
        out[kind].append(time.perf_counter() - start)
    return out


if __name__ == "__main__":
    sys.exit(main())
