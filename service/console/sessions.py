"""Console sign-in: server-side sessions in Redis, an HttpOnly SameSite=Strict cookie, a CSRF token per session.

A session is a random token in the cookie; Redis holds, under the token's sha256, the key id it was opened
with and the session's CSRF token, for `CONSOLE_SESSION_TTL` seconds from sign-in (not extended by use).
Every console request re-reads the key: a revoked key ends its sessions at once. Losing Redis signs
everybody out and loses nothing else.

The sign-in form itself is protected by a double-submit token: a short-lived cookie and the same value in
the form.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import Any

import redis
from flask import Response, g, redirect, request, url_for
from sqlalchemy import select
from werkzeug.wrappers import Response as BaseResponse

from service import context
from service.api.errors import ApiError
from service.auth import use_key
from service.store import db

SESSION_COOKIE = "pluristeer_console"
LOGIN_COOKIE = "pluristeer_console_login"
LOGIN_TTL_S = 600
COOKIE_PATH = "/console"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_REDIS_PREFIX = "pluristeer:console:session:"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class ConsoleSession:
    api_key_id: int
    csrf: str
    created_at: float


@contextmanager
def _session_store() -> Iterator[redis.Redis]:
    """Redis, or a 503 naming it: without the store nobody can be signed in."""
    try:
        yield context.redis_client()
    except redis.RedisError as exc:
        raise ApiError(503, "unavailable", f"the console's session store (Redis) is unavailable: {exc}") from None


def _redis_key(token: str) -> str:
    return _REDIS_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def open_session(key: db.ApiKey) -> tuple[str, ConsoleSession]:
    """A new session for `key`: (the cookie's token, the session)."""
    token = secrets.token_urlsafe(32)
    session = ConsoleSession(api_key_id=key.id, csrf=secrets.token_urlsafe(32), created_at=time.time())
    payload = json.dumps({"api_key_id": session.api_key_id, "csrf": session.csrf, "created_at": session.created_at})
    with _session_store() as store:
        store.set(_redis_key(token), payload, ex=context.settings().console_session_ttl)
    return token, session


def load_session(token: str | None) -> ConsoleSession | None:
    if not token:
        return None
    with _session_store() as store:
        raw = store.get(_redis_key(token))
    if raw is None:
        return None
    data = json.loads(raw)
    return ConsoleSession(api_key_id=int(data["api_key_id"]), csrf=str(data["csrf"]),
                          created_at=float(data["created_at"]))


def close_session(token: str | None) -> None:
    if token:
        with _session_store() as store:
            store.delete(_redis_key(token))


def set_cookie(response: BaseResponse, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, httponly=True, samesite="Strict",
                        secure=request.is_secure)


def clear_cookie(response: BaseResponse, name: str) -> None:
    response.delete_cookie(name, path=COOKIE_PATH, httponly=True, samesite="Strict", secure=request.is_secure)


def csrf_matches(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())


def _key_of(session: ConsoleSession) -> db.ApiKey | None:
    return context.session().scalar(select(db.ApiKey).where(db.ApiKey.id == session.api_key_id,
                                                            db.ApiKey.revoked_at.is_(None)))


def signed_in(view: Callable[..., Any]) -> Callable[..., Any]:
    """A console view: the session's tenant scopes it as a key scopes an API route; a state-changing
    request must carry the session's CSRF token (form field or header); the database session is
    committed when the view succeeds."""

    @wraps(view)
    def wrapper(**kwargs: Any) -> Any:
        session = load_session(request.cookies.get(SESSION_COOKIE))
        key = _key_of(session) if session is not None else None
        if session is None or key is None:
            if request.method in _SAFE_METHODS:
                return redirect(url_for("console.login", next=request.full_path.rstrip("?")))
            raise ApiError(401, "unauthorized", "sign in to the console first")
        if request.method not in _SAFE_METHODS:
            given = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD)
            if not csrf_matches(session.csrf, given):
                raise ApiError(403, "csrf_failed", "the form's CSRF token is missing or wrong; reload the page",
                               CSRF_FIELD)
        use_key(key)
        g.console_csrf = session.csrf
        result = view(**kwargs)
        db_session = context.session_if_open()
        if db_session is not None:
            status = result.status_code if isinstance(result, Response) else 200
            if status < 400:
                db_session.commit()
            else:
                db_session.rollback()
        return result

    return wrapper
