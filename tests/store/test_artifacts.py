"""The artifact store and the profile cache: real files, a real Redis, no mocks."""

from __future__ import annotations

import threading

import pytest
import redis
import torch
from runtime import redis_db_url

from service.store.artifacts import (
    REDIS_PREFIX,
    ArtifactCorrupted,
    ArtifactMissing,
    ArtifactStore,
    ProfileCache,
    sha256_hex,
)
from steer_core.profile import Profile


def profile_bytes(seed: float, size: int = 16) -> bytes:
    profile = Profile(method="diffmean", model_name="m", model_fingerprint="f", layer=1, positions="prompt",
                      strength=1.5, tensors={"vector": torch.arange(size, dtype=torch.float32) * seed})
    return profile.to_bytes()


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def rclient(redis_url):
    client = redis.Redis.from_url(redis_db_url(redis_url, 5))
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_put_is_content_addressed_idempotent_and_verified(store):
    data = profile_bytes(1.0)
    sha, size = store.put(data)
    assert sha == sha256_hex(data) and size == len(data)
    assert store.path(sha).read_bytes() == data
    assert store.put(data) == (sha, size)  # same bytes, same name, one file
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == [sha]
    assert store.get(sha) == data
    other, _ = store.put(profile_bytes(2.0))
    assert other != sha and store.get(other) != data


def test_get_detects_corruption_and_missing(store):
    data = profile_bytes(1.0)
    sha, _ = store.put(data)
    raw = bytearray(data)
    raw[-1] ^= 0x01  # one flipped bit in the tensor bytes
    store.path(sha).write_bytes(bytes(raw))
    with pytest.raises(ArtifactCorrupted) as info:
        store.get(sha)
    assert info.value.sha256 == sha
    store.put(data)  # putting the right bytes again repairs it
    assert store.get(sha) == data
    with pytest.raises(ArtifactMissing):
        store.get("0" * 64)


@pytest.mark.parametrize("bad", ["../etc/passwd", "ABC", "a" * 63, "A" * 64, ""])
def test_names_that_are_not_digests_are_refused(store, bad):
    with pytest.raises(ArtifactMissing):
        store.get(bad)
    with pytest.raises(ArtifactMissing):
        store.delete(bad)


def test_delete_removes_the_file_and_only_it(store):
    a, _ = store.put(profile_bytes(1.0))
    b, _ = store.put(profile_bytes(2.0))
    assert store.delete(a) is True
    assert store.delete(a) is False
    assert not store.exists(a) and store.exists(b)


def test_a_failed_write_leaves_no_file(store, monkeypatch):
    # os.replace failing (a full disk, a crash) must leave neither the artifact nor a temporary file.
    import service.store.artifacts as artifacts

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts.os, "replace", fail)
    with pytest.raises(OSError):
        store.put(profile_bytes(1.0))
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


def test_cache_tiers_lru_then_redis_then_store(store, rclient):
    data = profile_bytes(3.0)
    sha, _ = store.put(data)
    cache = ProfileCache(store, rclient, lru_size=4, ttl=60)
    first = cache.load(sha)
    assert torch.equal(first.tensors["vector"], Profile.from_bytes(data).tensors["vector"])
    assert cache.stats()["misses"] == 1
    assert rclient.get(REDIS_PREFIX + sha) == data  # the store read warmed Redis
    assert 0 < rclient.ttl(REDIS_PREFIX + sha) <= 60
    assert cache.load(sha) is first and cache.stats()["lru_hits"] == 1
    # A second process (empty LRU) is served by Redis even with the file gone.
    store.delete(sha)
    other = ProfileCache(store, rclient, lru_size=4, ttl=60)
    assert torch.equal(other.load(sha).tensors["vector"], first.tensors["vector"])
    assert other.stats()["redis_hits"] == 1 and other.stats()["misses"] == 0


def test_redis_flushed_or_down_still_serves_from_the_store(store, rclient):
    data = profile_bytes(4.0)
    sha, _ = store.put(data)
    ProfileCache(store, rclient).load(sha)
    rclient.flushdb()
    flushed = ProfileCache(store, rclient)
    assert flushed.load(sha).strength == 1.5
    assert flushed.stats()["misses"] == 1
    # A Redis nobody listens on: every cache call fails fast and counts, the store answers.
    from service.redis import client_for, free_port

    down_url = f"redis://127.0.0.1:{free_port()}/0"
    cache = ProfileCache(store, client_for(down_url), lru_size=0, redis_url=down_url)  # the service's client
    assert cache.load(sha).strength == 1.5
    assert cache.stats()["redis_errors"] == 1
    # Backing off: later reads and writes go straight to the store instead of waiting on Redis again.
    assert cache.load(sha).strength == 1.5 and cache.put(sha, data) is False
    assert cache.stats()["redis_errors"] == 1 and cache.stats()["misses"] == 2
    cache.forget(sha)  # a delete is still attempted: a deleted profile's copy must not outlive it
    assert cache.stats()["redis_errors"] == 2


def test_a_bad_copy_in_redis_is_dropped_and_the_store_decides(store, rclient):
    data = profile_bytes(5.0)
    sha, _ = store.put(data)
    rclient.set(REDIS_PREFIX + sha, data[:-4] + b"\x00\x00\x00\x00")
    cache = ProfileCache(store, rclient)
    profile = cache.load(sha)
    assert torch.equal(profile.tensors["vector"], Profile.from_bytes(data).tensors["vector"])
    assert cache.stats()["corrupted"] == 1 and cache.stats()["misses"] == 1
    assert rclient.get(REDIS_PREFIX + sha) == data  # replaced by the verified copy


def test_a_corrupted_file_is_never_parsed(store, rclient):
    data = profile_bytes(6.0)
    sha, _ = store.put(data)
    store.path(sha).write_bytes(profile_bytes(7.0))  # a valid profile, but not the one named
    cache = ProfileCache(store, rclient)
    with pytest.raises(ArtifactCorrupted):
        cache.load(sha)
    assert cache.stats()["corrupted"] == 1
    assert rclient.get(REDIS_PREFIX + sha) is None
    with pytest.raises(ArtifactCorrupted):
        cache.put(sha, profile_bytes(7.0))


def test_size_bound_lru_bound_and_forget(store, rclient):
    small, big = profile_bytes(1.0, 8), profile_bytes(1.0, 4096)
    s_sha, _ = store.put(small)
    b_sha, _ = store.put(big)
    cache = ProfileCache(store, rclient, lru_size=1, ttl=30, max_bytes=len(small))
    cache.load(b_sha)
    assert rclient.get(REDIS_PREFIX + b_sha) is None  # over max_bytes: the store only
    cache.load(s_sha)
    assert rclient.get(REDIS_PREFIX + s_sha) == small
    assert cache.stats()["lru_size"] == 1
    cache.load(b_sha)  # evicted by the small one: read again
    assert cache.stats()["misses"] == 3
    cache.forget(s_sha)
    assert rclient.get(REDIS_PREFIX + s_sha) is None


def test_concurrent_loads_agree(store, rclient):
    shas = [store.put(profile_bytes(float(i)))[0] for i in range(6)]
    cache = ProfileCache(store, rclient, lru_size=3)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for j in range(30):
                sha = shas[(k + j) % len(shas)]
                assert cache.load(sha).tensors["vector"][1].item() == float(shas.index(sha))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = cache.stats()
    assert stats["lru_hits"] + stats["redis_hits"] + stats["misses"] == 120
