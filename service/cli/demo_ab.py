"""The A/B part of `pluristeer demo`, run against a live server.

Two groups (urban and rural, from the test fixtures) get a DiffMean profile each; an experiment scoped to
a simulated population (the urban group's members) splits them between the two profiles; every member
chats once under the experiment and gives thumbs up or down, the urban-minded population liking the
urban-steered answers more often; the results table then shows the preferred variant winning.

The simulated feedback depends on the variant itself (a seeded stream of coins per variant, more often up
for the preferred one), so the demo shows the statistics machinery end to end, not the quality of the
text; the streams are fixed by the seed, so only the split of users between the variants (the server's
salted hash) varies from run to run.

With `results_dir` the results outlive the stack: the plot (PNG) and the results (JSON) are saved there and
the plot's path is printed, not a URL of a server that is about to stop.
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
PREFERRED, OTHER = "urban", "rural"
UP_RATE = {PREFERRED: 0.8, OTHER: 0.3}  # the simulated population's taste
QUESTIONS = ["Where would you rather live, and why?", "How do you get to work?",
             "What makes a neighbourhood a good place to live?", "Should towns build more bike lanes?"]


class DemoError(RuntimeError):
    pass


class Client:
    """A tiny JSON-over-HTTP client (stdlib only) with the bearer key."""

    def __init__(self, base_url: str, key: str, timeout: float = 120.0) -> None:
        self.base = base_url.rstrip("/")
        self.key = key
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201, 202)) -> Any:
        payload = self.raw(method, path, body, ok)
        return json.loads(payload) if payload else None

    def raw(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201, 202)) -> bytes:
        """The response's bytes (a plot, say); `DemoError` for a status not in `ok`."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.key}",
                                              "Content-Type": "application/json"})
        for attempt in range(5):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = resp.read()
                    status = resp.status
                break
            except urllib.error.HTTPError as err:
                payload, status = err.read(), err.code
                if status == 429 and attempt < 4:  # rate limited: wait as told
                    time.sleep(float(err.headers.get("Retry-After") or 1))
                    continue
                break
        if status not in ok:
            raise DemoError(f"{method} {path} -> {status}: {payload[:500].decode(errors='replace')}")
        return payload


def load_fixture(name: str, n: int) -> list[dict[str, Any]]:
    lines = (FIXTURES / name).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()][:n]


def build_profile(api: Client, gid: str, timeout: float, say: Callable[[str], None]) -> dict[str, Any]:
    """A DiffMean profile of group `gid` (layer and strength chosen on held-out items), once ready."""
    row = api.call("POST", "/v1/profiles", {"subject": {"kind": "group", "id": gid}, "method": "diffmean"})
    start = time.monotonic()
    last_quarter = -1
    while row["status"] not in ("ready", "failed"):
        if time.monotonic() - start > timeout:
            raise DemoError(f"profile of {gid} not ready after {timeout:.0f} s (is a worker running?)")
        progress = row.get("progress") or {}
        if progress.get("total"):  # progress in quarters: a readable story, not a log
            quarter = 4 * int(progress["done"]) // int(progress["total"])
            if quarter > last_quarter:
                say(f"  {gid}: {row['status']} {25 * quarter:3d}% ({progress.get('stage', '')}, "
                    f"{time.monotonic() - start:.0f} s)")
                last_quarter = quarter
        time.sleep(1.0)
        row = api.call("GET", f"/v1/profiles/{row['id']}")
    if row["status"] == "failed":
        raise DemoError(f"profile of {gid} failed: {row['error']}")
    chosen = row.get("chosen") or {}
    strength = chosen.get("strength")
    unsteered = " (cross-validation found no gain: this profile serves the unsteered model)" if strength == 0 else ""
    say(f"  {gid}: ready (layer {chosen.get('layer')}, strength {strength}){unsteered}")
    return row


def chat_once(api: Client, model: str, experiment_id: str, uid: str, question: str) -> tuple[str, str]:
    """One chat completion of `uid` under the experiment: (response id, variant served)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0,
            "user": uid, "steering": {"experiment": experiment_id}}
    resp = api.call("POST", "/v1/chat/completions", body)
    variant = (resp.get("steering") or {}).get("variant")
    if variant is None:  # the assignment is stored: asking again returns the variant that was served
        variant = api.call("POST", f"/v1/experiments/{experiment_id}/assign", {"user": uid})["variant"]
    return resp["id"], variant


def results_table(results: dict[str, Any]) -> str:
    head = f"{'variant':<10} {'exposures':>9} {'feedback':>8} {'thumbs up':>9} {'95% interval':>16} " \
           f"{'vs control':>10} {'p-value':>9}"
    lines = [head, "-" * len(head)]
    for v in results["variants"]:
        r = v["reward"]
        interval = f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if r["ci_low"] is not None else "-"
        mean = f"{r['mean']:.2f}" if r["mean"] is not None else "-"
        vs = v["vs_control"]
        diff = "control" if vs is None else (f"{vs['difference']:+.2f}" if vs["difference"] is not None else "-")
        p = "" if vs is None else (f"{vs['p_value']:.2g}" if vs["p_value"] is not None else "-")
        lines.append(f"{v['name']:<10} {v['exposures']:>9} {v['feedback']:>8} {mean:>9} {interval:>16} "
                     f"{diff:>10} {p:>9}")
    offline = results["offline"]
    if offline["available"]:
        lines.append("")
        lines.append(f"offline: alignment on {offline['items']} {offline['evaluation']} opinion items of the scope")
        for v in results["variants"]:
            lines.append(f"  {v['name']:<10} {v['offline']['alignment']:.3f}")
    else:
        lines.append("")
        lines.append(f"offline: {offline['detail']}")
    return "\n".join(lines)


def save_results(api: Client, experiment_id: str, results: dict[str, Any], directory: Path) -> Path:
    """The experiment's plot (`ab-<id>.png`) and results (`ab-<id>.json`) saved in `directory`, to read after
    the stack has stopped; returns the plot's path."""
    directory.mkdir(parents=True, exist_ok=True)
    plot = directory / f"ab-{experiment_id}.png"
    plot.write_bytes(api.raw("GET", f"/v1/experiments/{experiment_id}/results.png"))
    (directory / f"ab-{experiment_id}.json").write_text(json.dumps(results, indent=2) + "\n")
    return plot


def run_ab_demo(base_url: str, key: str, *, users: int = 120, seed: int = 0, build_timeout: float = 900.0,
                say: Callable[[str], None] = print, results_dir: Path | None = None) -> int:
    """Run the A/B demo against the server at `base_url` with `key`; 0 when the preferred variant wins. With
    `results_dir`, the plot and the results are saved there (`save_results`) and the plot's path printed."""
    api = Client(base_url, key)
    rng = random.Random(seed)
    tag = f"{int(time.time())}-{rng.randrange(1 << 16):04x}"  # fresh names: the demo can run again
    population = [f"ab-{tag}-user-{i:03d}" for i in range(users)]
    groups = {PREFERRED: f"ab-{tag}-urban", OTHER: f"ab-{tag}-rural"}
    say(f"A/B demo: {users} simulated users; their thumbs are coins, up {UP_RATE[PREFERRED]:.0%} of the time under "
        f"the {PREFERRED} variant and {UP_RATE[OTHER]:.0%} under {OTHER}, whatever the answers say (this step shows "
        f"the experiment machinery, not which profile answers better)")
    for uid in population:
        api.call("PUT", f"/v1/users/{uid}", {})
    api.call("PUT", f"/v1/groups/{groups[PREFERRED]}", {"members": population})
    api.call("PUT", f"/v1/groups/{groups[OTHER]}", {})
    for name, gid in groups.items():
        api.call("POST", f"/v1/groups/{gid}/opinions",
                 {"items": load_fixture(f"opinions_group_{name}.jsonl", 12)})
    say("building one DiffMean profile per group:")
    profiles = {name: build_profile(api, gid, build_timeout, say) for name, gid in groups.items()}
    exp = api.call("POST", "/v1/experiments", {
        "name": f"A/B demo {tag}", "reward": "thumbs", "control": OTHER, "scope": {"group": groups[PREFERRED]},
        "variants": [{"name": OTHER, "weight": 1, "profiles": [{"id": profiles[OTHER]["id"], "weight": 1}]},
                     {"name": PREFERRED, "weight": 1, "profiles": [{"id": profiles[PREFERRED]["id"], "weight": 1}]}]})
    say(f"experiment {exp['id']}: {OTHER} (control) vs {PREFERRED}, 50/50, scoped to {groups[PREFERRED]}")

    # Every member chats once (a few at a time, so the engine batches them) and gives thumbs.
    model = api.call("GET", "/readyz", ok=(200, 503))["model"]
    questions = {uid: QUESTIONS[i % len(QUESTIONS)] for i, uid in enumerate(population)}
    with ThreadPoolExecutor(max_workers=8) as pool:
        served = list(pool.map(lambda uid: (uid, *chat_once(api, model, exp["id"], uid, questions[uid])),
                               population))
    coins = {name: random.Random(f"{seed}-{name}") for name in UP_RATE}
    for _, response_id, variant in served:
        up = coins[variant].random() < UP_RATE[variant]
        api.call("POST", f"/v1/experiments/{exp['id']}/feedback", {"response_id": response_id, "thumbs": up})
    results = api.call("GET", f"/v1/experiments/{exp['id']}/results")
    # The first results request asks a worker for the offline comparison; it is read back once stored.
    deadline = time.monotonic() + build_timeout
    while results["offline"]["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(1.0)
        results = api.call("GET", f"/v1/experiments/{exp['id']}/results")
    say("")
    say(results_table(results))
    say("")
    say(f"winner: {results['winner'] or 'none (no variant is significantly better than the control)'}")
    if results_dir is None:
        say(f"plot: {api.base}/v1/experiments/{exp['id']}/results.png")
    else:
        plot = save_results(api, exp["id"], results, results_dir)
        say(f"plot: {plot} (the results as JSON beside it; both stay when the stack stops)")
    return 0 if results["winner"] == PREFERRED else 1
