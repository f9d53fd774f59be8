"""How long a subject fit against a population takes through the API, worker included (issue 28's cost target:
p95 5 s or less from 20 answers).

    .venv/bin/python bench/population_fit_api.py [--data DIR] [--attribute POLIDEOLOGY] [--subject Liberal]
        [--build-questions 24] [--subjects 20] [--answers 20] [--port 8765]

Starts `pluristeer up` on a fresh temporary home (embedded Redis, SQLite, one build worker, the API), puts the
groups of `--attribute` except `--subject` over `--build-questions` shared questions, learns a population from
them through `POST /v1/populations`, then for each of `--subjects` simulated people (one answer per question,
drawn from the left-out group's distributions on `--answers` other questions): `PUT /v1/users/{uid}`,
`POST .../opinions`, and `POST /v1/profiles` with method `population`, timed from that POST until
`GET /v1/profiles/{id}` says ready (polled every 200 ms). Side by side in the same run: the same fits in this
process with the model already loaded (`fit_subject_profile`), so the service's share of the time (queue,
worker claim, store, cache) is the difference; and each fit's time in the worker as Celery logged it. The
population's size matters little to a fit: its cost is the subject's own reads (its answers in both option
orders, and once more steered when the population steers).

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
    rng = np.random.default_rng(0)
    people = [simulated_person(pick(groups[left_out], judge_idx), rng) for _ in range(args.subjects)]

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

            api_s: list[float] = []
            for i, answers in enumerate(people):
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
                api_s.append(time.perf_counter() - start)
                if profile["status"] != "ready":
                    raise SystemExit(f"a subject fit failed: {profile.get('error')}")
                print(f"  {uid}: through the API {api_s[-1]:.2f} s", flush=True)
            # The population's file, from the home's content-addressed store (the API serves no download).
            artifact = next(Path(tmp).rglob(population["artifact"]["sha256"])).read_bytes()
        finally:
            stop_stack(proc)
        # The worker's own time for each fit (Celery's "succeeded in"), to tell a slow fit from a slow service.
        task_s = [float(m) for m in re.findall(r"build_profile\[[^]]+\] succeeded in ([0-9.]+)s",
                                               (Path(tmp) / "up.log").read_text(errors="replace"))]

    in_process_s = fit_in_process(people, artifact)
    print(f"\nsubject fit from {args.answers} answers, {args.subjects} subjects, this machine "
          f"({os.cpu_count()} cores, shared):")
    print(f"  through the API (POST to ready): median {np.median(api_s):.2f} s, p95 {np.percentile(api_s, 95):.2f} s")
    if len(task_s) == len(api_s):
        print(f"  the worker's task alone:          median {np.median(task_s):.2f} s, "
              f"p95 {np.percentile(task_s, 95):.2f} s (each fit: {', '.join(f'{t:.1f}' for t in task_s)})")
    print(f"  in this process, model loaded:   median {np.median(in_process_s):.2f} s, "
          f"p95 {np.percentile(in_process_s, 95):.2f} s")
    print(f"  the service's share (median difference): {np.median(api_s) - np.median(in_process_s):+.2f} s")
    print(f"  target (issue 28): p95 through the API <= 5 s: {'PASS' if np.percentile(api_s, 95) <= 5 else 'FAIL'}")
    return 0


def fit_in_process(people: list[list[OpinionItem]], artifact: bytes) -> list[float]:
    """The same fits with the model loaded here."""
    from steer_core import load_model
    from steer_core.population import Population
    from steer_core.population_build import fit_subject_profile

    lm = load_model()
    population = Population.from_bytes(artifact)
    fit_subject_profile(lm, population, people[0])  # warm-up, as the worker's first fit is not timed apart
    out = []
    for answers in people:
        start = time.perf_counter()
        fit_subject_profile(lm, population, answers)
        out.append(time.perf_counter() - start)
    return out


if __name__ == "__main__":
    sys.exit(main())
