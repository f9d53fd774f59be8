"""Profile cache: how much each tier saves, measured side by side in one run.

Loads the same artifact from the in-process LRU, from Redis (empty LRU), from the store (Redis flushed),
and with Redis down (the store after one failed connection, then backing off), for a small profile
(a DiffMean vector) and a large one (a few hundred MB of tensors would be a full COLD-FD gradient; the
default here is 32 MB to keep the run short). Prints milliseconds per load and ratios to the store path.

    .venv/bin/python bench/bench_profile_cache.py [--large-mb 32] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from service.redis import client_for, ensure_redis, free_port, stop_embedded_redis
from service.store.artifacts import ArtifactStore, ProfileCache
from steer_core.profile import Profile


def artifact(n_floats: int) -> bytes:
    profile = Profile(method="diffmean", model_name="bench", model_fingerprint="bench", layer=1,
                      positions="prompt", strength=1.0, tensors={"vector": torch.randn(n_floats)})
    return profile.to_bytes()


def timed(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large-mb", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    url = ensure_redis(None)
    client = client_for(url)
    down_url = f"redis://127.0.0.1:{free_port()}/0"
    down = client_for(down_url)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = ArtifactStore(Path(tmp))
            rows = []
            for label, n in (("small (576 floats)", 576), (f"large ({args.large_mb} MB)", args.large_mb << 18)):
                sha, size = store.put(artifact(n))
                warm = ProfileCache(store, client, lru_size=4, max_bytes=1 << 30)
                warm.load(sha)
                lru = timed(lambda: warm.load(sha), args.repeat)  # noqa: B023
                redis_tier = timed(lambda: ProfileCache(store, client, lru_size=0, max_bytes=1 << 30)  # noqa: B023
                                   .load(sha), args.repeat)  # noqa: B023

                def from_store() -> None:
                    client.flushdb()
                    ProfileCache(store, client, lru_size=0, max_bytes=1 << 30).load(sha)  # noqa: B023

                store_tier = timed(from_store, args.repeat)
                backing_off = ProfileCache(store, down, lru_size=0, redis_url=down_url)
                backing_off.load(sha)  # the one failed connection
                redis_down = timed(lambda: backing_off.load(sha), args.repeat)  # noqa: B023
                rows.append((label, size, lru, redis_tier, store_tier, redis_down))
    finally:
        stop_embedded_redis()
    print(f"median ms per load over {args.repeat} loads (ratio to the store path)")
    print(f"{'artifact':<20}{'bytes':>12}{'LRU':>18}{'Redis':>18}{'store':>12}{'Redis down':>18}")
    for label, size, lru, red, sto, dn in rows:
        print(f"{label:<20}{size:>12}{lru:>9.3f} ({lru / sto:5.3f}){red:>9.3f} ({red / sto:5.2f})"
              f"{sto:>12.3f}{dn:>9.3f} ({dn / sto:5.2f})")


if __name__ == "__main__":
    main()
