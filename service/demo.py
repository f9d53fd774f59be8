"""`pluristeer demo`: walk through the service against a running server.

Makes a group, posts its opinions (`tests/fixtures/opinions_group_urban.jsonl`), asks for a DiffMean
profile, follows its progress, and prints the held-out alignment before and after steering. Talks
HTTP only (urllib), exactly as any client would.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from service.settings import Settings

DEMO_ITEMS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "opinions_group_urban.jsonl"


class DemoError(RuntimeError):
    pass


class Client:
    def __init__(self, url: str, key: str) -> None:
        self.url = url.rstrip("/")
        self.key = key

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
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
        if status >= 400:
            error = (payload or {}).get("error", {}) if isinstance(payload, dict) else {}
            raise DemoError(f"{method} {path} -> {status}: {error.get('message', raw[:300])}"
                            + (f" (field {error['field']})" if error.get("field") else ""))
        return status, payload


def read_items(path: Path, limit: int) -> list[dict[str, Any]]:
    if not path.exists():
        raise DemoError(f"the demo items file {path} is missing (it ships in the source tree's tests/fixtures)")
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return items[:limit] if limit else items


def default_connection(url: str | None, key: str | None) -> tuple[str, str]:
    """The URL and key given, else the ones `pluristeer up` saved."""
    if url and key:
        return url, key
    from service.stack import up_file

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
    """`pluristeer demo [--url URL] [--key KEY] [--items N] [--timeout S]`."""
    try:
        url, key = default_connection(getattr(args, "url", None), getattr(args, "key", None))
        code = run(Client(url, key), items=int(getattr(args, "items", None) or 16),
                   timeout=float(getattr(args, "timeout", None) or 1800))
        if code != 0 or getattr(args, "skip_ab", False):
            return code
        from service.demo_ab import run_ab_demo

        print("\nA/B test: two group profiles, a simulated population that prefers one of them")
        return run_ab_demo(url, key)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(client: Client, items: int = 16, timeout: float = 1800.0) -> int:
    gid = f"urban-demo-{uuid.uuid4().hex[:6]}"
    sample = read_items(DEMO_ITEMS, items)
    client.call("PUT", f"/v1/groups/{gid}", {"members": []})
    print(f"group {gid}: created")
    client.call("POST", f"/v1/groups/{gid}/opinions", {"items": sample})
    print(f"group {gid}: {len(sample)} survey answers posted (a distribution per question)")
    status, profile = client.call("POST", "/v1/profiles", {"subject": {"kind": "group", "id": gid},
                                                           "method": "diffmean"})
    pid = profile["id"]
    print(f"profile {pid}: {profile['status']} (HTTP {status}); the worker chooses layer and strength "
          "on held-out questions")
    deadline = time.monotonic() + timeout
    last = None
    while True:
        _, profile = client.call("GET", f"/v1/profiles/{pid}")
        progress = profile.get("progress") or {}
        line = f"  {profile['status']}"
        if progress.get("total"):
            line += f" {progress['done']}/{progress['total']}"
        if progress.get("stage"):
            line += f" ({progress['stage']})"
        if line != last:
            print(line, flush=True)
            last = line
        if profile["status"] in ("ready", "failed"):
            break
        if time.monotonic() > deadline:
            raise DemoError(f"the profile was not built within {timeout:.0f} s")
        time.sleep(1.0)
    if profile["status"] == "failed":
        print(f"build failed: {profile.get('error')}", file=sys.stderr)
        return 1
    show(profile)
    return 0


def show(profile: dict[str, Any]) -> None:
    metrics = profile.get("metrics") or {}
    chosen = profile.get("chosen") or {}
    before = (metrics.get("unsteered") or {}).get("alignment")
    after = (metrics.get("steered") or {}).get("alignment")
    artifact = profile.get("artifact") or {}
    print(f"ready: layer {chosen.get('layer')}, strength {chosen.get('strength')}, "
          f"artifact {str(artifact.get('sha256', ''))[:12]} ({artifact.get('size')} bytes)")
    if before is not None and after is not None:
        print(f"{metrics.get('evaluation', 'held-out')} alignment with the group: unsteered {before:.4f} -> "
              f"steered {after:.4f}")
    if metrics.get("note"):
        print(metrics["note"])
