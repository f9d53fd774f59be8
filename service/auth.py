"""Bearer keys. A key is shown once when created; only its sha256 (and a short display prefix) is stored.

Every API route authenticates through `authenticate()` (called by `service.api.openapi.api_route`), which sets
`g.tenant_id` (the scope of every query) and `g.api_key_id`, and then applies the per-key and per-tenant rate
limits. A tenant holds at most `MAX_KEYS_PER_TENANT` unrevoked keys made through the API (`POST /v1/keys`); the
operator's `pluristeer keys create` is not capped.
"""

from __future__ import annotations

import secrets
import sys
from typing import Any

from flask import g, request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import context
from service.api.errors import ApiError
from service.store import db

KEY_PREFIX = "psk_"
DISPLAY_CHARS = 12


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(session: Session, tenant_name: str, name: str | None = None) -> str:
    """Create a key for `tenant_name` (creating the tenant when new) and return it; it is not stored."""
    tenant = tenant_name.strip()
    if not tenant or len(tenant) > 200:
        raise ValueError("tenant name must be 1 to 200 characters")
    return add_key(session, db.get_or_create_tenant(session, tenant).id, name)[0]


class TooManyKeys(Exception):
    """The tenant already holds its cap of unrevoked keys."""

    def __init__(self, held: int, cap: int) -> None:
        super().__init__(f"this tenant holds {held} unrevoked keys, the most allowed (MAX_KEYS_PER_TENANT={cap}); "
                         "revoke one (DELETE /v1/keys/{prefix}) before creating another")
        self.held, self.cap = held, cap


def active_key_count(session: Session, tenant_id: int) -> int:
    return int(session.scalar(select(func.count()).select_from(db.ApiKey).where(
        db.ApiKey.tenant_id == tenant_id, db.ApiKey.revoked_at.is_(None))) or 0)


def add_key(session: Session, tenant_id: int, name: str | None = None,
            cap: int | None = None) -> tuple[str, db.ApiKey]:
    """A new key of the tenant `tenant_id`: (the key, shown once; its row). Its display prefix is unique,
    so a prefix names one key in `list` and `revoke`. With `cap`, TooManyKeys when the tenant already holds
    that many unrevoked keys (the tenant's row is locked first on PostgreSQL, so two requests at once cannot
    both take the last place)."""
    if name is not None and not 1 <= len(name.strip()) <= 200:
        raise ValueError("a key's name must be 1 to 200 characters")
    if cap is not None:
        session.scalar(select(db.Tenant.id).where(db.Tenant.id == tenant_id).with_for_update())
        held = active_key_count(session, tenant_id)
        if held >= cap:
            raise TooManyKeys(held, cap)
    while True:
        key = new_key()
        if session.scalar(select(db.ApiKey.id).where(db.ApiKey.prefix == key[:DISPLAY_CHARS])) is None:
            break
    row = db.ApiKey(tenant_id=tenant_id, key_sha256=db.hash_key(key), prefix=key[:DISPLAY_CHARS],
                    name=name.strip() if name is not None else None)
    session.add(row)
    session.flush()
    return key, row


def tenant_keys(session: Session, tenant_id: int) -> list[db.ApiKey]:
    """The tenant's keys, revoked ones included, oldest first."""
    return list(session.scalars(select(db.ApiKey).where(db.ApiKey.tenant_id == tenant_id)
                                .order_by(db.ApiKey.created_at, db.ApiKey.id)))


def revoke_prefix(session: Session, prefix: str, tenant_id: int | None = None) -> db.ApiKey | None:
    """Revoke the key with display prefix `prefix` (of tenant `tenant_id` when given: another tenant's key
    is not found). Returns its row (already revoked ones unchanged), or None."""
    query = select(db.ApiKey).where(db.ApiKey.prefix == prefix)
    if tenant_id is not None:
        query = query.where(db.ApiKey.tenant_id == tenant_id)
    row = session.scalar(query)
    if row is not None and row.revoked_at is None:
        row.revoked_at = db.utcnow()
    return row


def revoke_key(session: Session, key: str) -> bool:
    """Revoke `key` itself; False when it is unknown or already revoked."""
    row = session.scalar(select(db.ApiKey).where(db.ApiKey.key_sha256 == db.hash_key(key)))
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = db.utcnow()
    return True


def _migrated_url(args: Any) -> str | None:
    from service.settings import Settings

    url = getattr(args, "database_url", None) or Settings.from_env().database_url
    if not db.is_current(url):
        print("error: the database is not migrated; run `pluristeer db upgrade` first", file=sys.stderr)
        return None
    return url


def create_key_cli(args: Any) -> int:
    """`pluristeer keys create --tenant NAME [--name N]`: print a new key once."""
    url = _migrated_url(args)
    if url is None:
        return 1
    try:
        with db.session_scope(url) as session:
            key = create_key(session, args.tenant, getattr(args, "name", None))
    except ValueError as exc:
        print(f"error: --{'tenant' if 'tenant' in str(exc) else 'name'}: {exc}", file=sys.stderr)
        return 2
    print(key)
    print(f"(tenant {args.tenant.strip()!r}; this key is shown once: only its hash is stored)",
          file=sys.stderr)
    return 0


def list_keys_cli(args: Any) -> int:
    """`pluristeer keys list [--tenant NAME]`: prefix, tenant, name, created and revoked times (no secrets)."""
    url = _migrated_url(args)
    if url is None:
        return 1
    with db.session_scope(url) as session:
        query = select(db.ApiKey, db.Tenant.name).join(db.Tenant, db.Tenant.id == db.ApiKey.tenant_id)
        if getattr(args, "tenant", None):
            query = query.where(db.Tenant.name == args.tenant.strip())
        rows = session.execute(query.order_by(db.Tenant.name, db.ApiKey.created_at, db.ApiKey.id)).all()
        print(f"{'prefix':<14}{'tenant':<20}{'name':<20}{'created':<22}revoked")
        for key, tenant in rows:
            revoked = key.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if key.revoked_at else "-"
            print(f"{key.prefix:<14}{tenant[:19]:<20}{(key.name or '-')[:19]:<20}"
                  f"{key.created_at.strftime('%Y-%m-%d %H:%M:%S'):<22}{revoked}")
    return 0


def revoke_key_cli(args: Any) -> int:
    """`pluristeer keys revoke PREFIX`: the key stops working at once (401)."""
    url = _migrated_url(args)
    if url is None:
        return 1
    with db.session_scope(url) as session:
        row = revoke_prefix(session, args.prefix.strip())
        if row is None:
            print(f"error: PREFIX: no key starts with {args.prefix!r} (see `pluristeer keys list`)",
                  file=sys.stderr)
            return 2
        print(f"revoked {row.prefix}")
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
    """Scope the request to `row`'s tenant (`g.tenant_id`) and apply the key's and the tenant's rate limits:
    the API and the console alike."""
    g.tenant_id = row.tenant_id
    g.api_key_id = row.id
    # End the lookup's read transaction: a route that then works for long (generation) must not hold
    # one open; its own queries start a fresh transaction.
    context.session().commit()
    from service.api.ratelimit import enforce

    enforce(row.key_sha256[:32], row.tenant_id)
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
