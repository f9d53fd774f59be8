"""Bearer keys. A key is shown once when created; only its sha256 (and a short display prefix) is stored.

Every API route authenticates through `authenticate()` (called by `service.openapi.api_route`), which sets
`g.tenant_id` (the scope of every query) and `g.api_key_id`, and then applies the per-key rate limit.
"""

from __future__ import annotations

import secrets
import sys
from typing import Any

from flask import g, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import context, db
from service.errors import ApiError

KEY_PREFIX = "psk_"
DISPLAY_CHARS = 12


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(session: Session, tenant_name: str) -> str:
    """Create a key for `tenant_name` (creating the tenant when new) and return it; it is not stored."""
    name = tenant_name.strip()
    if not name or len(name) > 200:
        raise ValueError("tenant name must be 1 to 200 characters")
    tenant = db.get_or_create_tenant(session, name)
    key = new_key()
    session.add(db.ApiKey(tenant_id=tenant.id, key_sha256=db.hash_key(key), prefix=key[:DISPLAY_CHARS]))
    session.flush()
    return key


def revoke_key(session: Session, key: str) -> bool:
    row = session.scalar(select(db.ApiKey).where(db.ApiKey.key_sha256 == db.hash_key(key)))
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = db.utcnow()
    return True


def create_key_cli(args: Any) -> int:
    """`pluristeer keys create --tenant NAME`: print a new key once (the database must be migrated)."""
    from service.settings import Settings

    settings = Settings.from_env()
    url = getattr(args, "database_url", None) or settings.database_url
    if not db.is_current(url):
        print("error: the database is not migrated; run `pluristeer db upgrade` first", file=sys.stderr)
        return 1
    try:
        with db.session_scope(url) as session:
            key = create_key(session, args.tenant)
    except ValueError as exc:
        print(f"error: --tenant: {exc}", file=sys.stderr)
        return 2
    print(key)
    print(f"(tenant {args.tenant.strip()!r}; this key is shown once: only its hash is stored)",
          file=sys.stderr)
    return 0


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, "Authorization",
                    {"WWW-Authenticate": 'Bearer realm="pluristeer"'})


def bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise _unauthorized("missing Authorization header; send `Authorization: Bearer <key>`")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("the Authorization header must be `Bearer <key>`")
    return token.strip()


def active_key(session: Session, token: str) -> db.ApiKey | None:
    """The unrevoked key whose hash matches `token`, or None."""
    return session.scalar(select(db.ApiKey).where(db.ApiKey.key_sha256 == db.hash_key(token),
                                                 db.ApiKey.revoked_at.is_(None)))


def use_key(row: db.ApiKey) -> int:
    """Scope the request to `row`'s tenant (`g.tenant_id`) and apply the key's rate limit: the API and the
    console alike."""
    g.tenant_id = row.tenant_id
    g.api_key_id = row.id
    # End the lookup's read transaction: a route that then works for long (generation) must not hold
    # one open; its own queries start a fresh transaction.
    context.session().commit()
    from service.ratelimit import enforce

    enforce(row.key_sha256[:32])
    return row.tenant_id


def authenticate() -> int:
    """Resolve the request's key to its tenant (401 otherwise), set `g.tenant_id`, apply the rate limit."""
    row = active_key(context.session(), bearer_token())
    if row is None:
        raise _unauthorized("unknown or revoked API key")
    return use_key(row)


def tenant_id() -> int:
    """The authenticated request's tenant."""
    return int(g.tenant_id)
