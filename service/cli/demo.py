"""`pluristeer demo`: walk through the service against a running server.

Makes a group, posts its opinions (`tests/fixtures/opinions_group_urban.jsonl`), asks for a DiffMean
profile, follows its progress, prints the cross-validated alignment before and after steering (the gain
with its standard error), asks one question unsteered and steered, then runs the A/B part
(`service.cli.demo_ab`), whose plot and results it saves under `$PLURISTEER_HOME/demo/` (`results_dir`) so
they stay readable after the stack stops. `--no-builds` stops after the group and one unsteered chat: a quick
check that a stack answers. Talks HTTP only (urllib), exactly as any client would.

It writes into the stack it talks to. `make demo` (scripts/demo.sh) starts that stack in a fresh home of its
own, so nothing reaches the user's database.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.settings import Settings

DEMO_ITEMS = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "opinions_group_urban.jsonl"


class DemoError(RuntimeError):
    pass


class Client:
    def __init__(self, url: str, key: str) -> None:
        self.url = url.rstrip("/")
        self.key = key

    def call(self, method: str, path: str, body: Any = None, allow: tuple[int, ...] = ()) -> tuple[int, Any]:
        """(status, JSON body); `DemoError` for a status of 400 or more that is not in `allow`."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            raise DemoError(f"cannot reach {self.url}: {exc}") from None
        payload = json.loads(raw) if raw else None
        if status >= 400 and status not in allow:
            error = (payload or {}).get("error", {}) if isinstance(payload, dict) else {}
            raise DemoError(f"{method} {path} -> {status}: {error.get('message', raw[:300])}"
                            + (f" (field {error['field']})" if error.get("field") else ""))
        return status, payload


def results_dir() -> Path:
    """Where the demo keeps what it shows (the A/B plot and results): `demo/` in the home it runs under."""
    return Path(Settings.from_env().home) / "demo"


def read_items(path: Path, limit: int) -> list[dict[str, Any]]:
    if not path.exists():
        raise DemoError(f"the demo items file {path} is missing (it ships in the source tree's tests/fixtures)")
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return items[:limit] if limit else items


def default_connection(url: str | None, key: str | None) -> tuple[str, str]:
    """The URL and key given, else the ones `pluristeer up` saved."""
    if url and key:
        return url, key
    from service.cli.stack import up_file

    path = up_file(Settings.from_env())
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    url = url or saved.get("url")
    key = key or saved.get("key")
    if not key:
        raise DemoError(f"no API key: pass --key, or run `pluristeer up` first (it saves one in {path})")
    return url or "http://127.0.0.1:8000", key


def main(args: Any) -> int:
    """`pluristeer demo [--url URL] [--key KEY] [--items N] [--timeout S] [--skip-ab] [--no-builds]`."""
    try:
        url, key = default_connection(getattr(args, "url", None), getattr(args, "key", None))
        builds = not getattr(args, "no_builds", False)
        ab = builds and not getattr(args, "skip_ab", False)
        steps = Steps(2 + builds + ab)
        code = run(Client(url, key), steps, items=int(getattr(args, "items", None) or 16),
                   timeout=float(getattr(args, "timeout", None) or 1800), builds=builds)
        if code != 0 or not ab:
            return code
        from service.cli.demo_ab import run_ab_demo

        steps.next("an A/B test: two group profiles, a simulated population that prefers one of them")
        return run_ab_demo(url, key, say=lambda line: print(f"      {line}" if line else "", flush=True),
                           results_dir=results_dir())
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


class Steps:
    """Numbered step headers: `[2/4] what happens now`."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def next(self, title: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {title}", flush=True)


def say(line: str) -> None:
    print(f"      {line}", flush=True)


def run(client: Client, steps: Steps, items: int = 16, timeout: float = 1800.0, builds: bool = True) -> int:
    gid = f"urban-demo-{uuid.uuid4().hex[:6]}"
    sample = read_items(DEMO_ITEMS, items)
    steps.next(f"a group and its opinions: {gid}")
    client.call("PUT", f"/v1/groups/{gid}", {"members": []})
    client.call("POST", f"/v1/groups/{gid}/opinions", {"items": sample})
    say(f"{len(sample)} survey questions posted, each with the group's distribution over its answers")
    profile = None
    if builds:
        steps.next("a DiffMean profile of the group, built by the worker")
        profile = follow_build(client, gid, timeout, say)
        if profile["status"] == "failed":
            print(f"build failed: {profile.get('error')}", file=sys.stderr)
            return 1
        show(profile)
    steps.next("one question through the OpenAI-compatible chat route" + (", unsteered and steered" if builds else ""))
    ready = wait_for_model(client, timeout, say)
    models = [ready["model"]] + ([f"{ready['model']}:{profile['id']}"] if profile else [])
    question = "In one sentence: is it better to live in a city or in the countryside?"
    say(f"question: {question}")
    for model in models:
        _, reply = client.call("POST", "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 40,
            "temperature": 0})
        text = " ".join(reply["choices"][0]["message"]["content"].split())
        say(f"{'steered' if ':' in model else 'unsteered':>9}: {text}")
    return 0


def wait_for_model(client: Client, timeout: float, report: Callable[[str], None]) -> dict[str, Any]:
    """/readyz once the API has its model: it loads it at start-up (fetched and converted first on a fresh
    home), and chats get 503 meanwhile."""
    deadline = time.monotonic() + timeout
    told = False
    while True:
        _, ready = client.call("GET", "/readyz", allow=(503,))
        if ready.get("status") != "loading":
            return dict(ready)
        if not told:
            report(f"the API is still loading its model ({ready['checks']['model']['detail']}); waiting for it")
            told = True
        if time.monotonic() > deadline:
            raise DemoError(f"the API did not load its model within {timeout:.0f} s")
        time.sleep(1.0)


def follow_build(client: Client, gid: str, timeout: float, report: Callable[[str], None]) -> dict[str, Any]:
    """Ask for a DiffMean profile of group `gid` and wait for it, reporting progress in quarters."""
    start = time.monotonic()
    _, profile = client.call("POST", "/v1/profiles", {"subject": {"kind": "group", "id": gid}, "method": "diffmean"})
    pid = profile["id"]
    report(f"profile {pid} {profile['status']}; layer and strength are chosen by cross-validation on the "
           "group's own questions")
    last_quarter = -1
    while profile["status"] not in ("ready", "failed"):
        if time.monotonic() - start > timeout:
            raise DemoError(f"the profile was not built within {timeout:.0f} s (is a worker running?)")
        time.sleep(1.0)
        _, profile = client.call("GET", f"/v1/profiles/{pid}")
        progress = profile.get("progress") or {}
        if progress.get("total"):
            quarter = 4 * int(progress["done"]) // int(progress["total"])
            if quarter > last_quarter:
                report(f"{profile['status']} {25 * quarter:3d}% ({progress.get('stage', '')}, "
                       f"{time.monotonic() - start:.0f} s)")
                last_quarter = quarter
    if profile["status"] == "ready":
        report(f"ready after {time.monotonic() - start:.0f} s")
    return profile


def show(profile: dict[str, Any]) -> None:
    metrics = profile.get("metrics") or {}
    chosen = profile.get("chosen") or {}
    before = (metrics.get("unsteered") or {}).get("alignment")
    after = (metrics.get("steered") or {}).get("alignment")
    say(f"chosen: layer {chosen.get('layer')}, strength {chosen.get('strength')}")
    if before is not None and after is not None:
        say(f"{metrics.get('evaluation', 'held-out')} alignment with the group: unsteered {before:.3f}, "
            f"steered {after:.3f}")
    gain = dict(metrics.get("gain") or {})
    error = gain.pop("standard_error", None)
    for metric, value in gain.items():
        say(f"best setting's gain in {metric}: {value:+.3f} ± {error:.3f} (± one standard error; a gain "
            "within about two of them can be luck)")
    if metrics.get("note"):
        say(metrics["note"])
    verdict = profile.get("verdict")
    if verdict:  # the plain words: whether the gain is real (above calibrated and uniform by one SE) or not
        say(f"verdict: {verdict['summary']}")
        if verdict.get("generation_gain"):
            chat = verdict["generation_gain"]
            say(f"what chat gets from it: {chat['mean']:+.3f} ± {chat['standard_error']:.3f} over unsteered "
                "(the steering alone; the calibration acts on option distributions only)")
