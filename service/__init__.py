"""The pluristeer HTTP service: `create_app()` builds the Flask app; nothing starts until a request
needs it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.settings import Settings

if TYPE_CHECKING:
    from flask import Flask


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """The API app. `test_config` may hold `SETTINGS` (a `Settings`) and any Flask config keys;
    without `SETTINGS` the settings come from the environment."""
    from flask import Flask  # here, not at the top: the command line imports this package and stays fast

    from service import console, context, observability
    from service.api import (
        chat,
        errors,
        experiments,
        groups,
        health,
        keys,
        metrics,
        models,
        openapi,
        opinions,
        populations,
        profiles,
        users,
    )

    app = Flask(__name__)
    config = dict(test_config or {})
    settings = config.pop("SETTINGS", None) or Settings.from_env()
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes  # werkzeug answers 413 past it
    app.config.update(config)
    app.config["SETTINGS"] = settings

    context.init_app(app, settings)
    errors.register_error_handlers(app)
    observability.init_app(app)
    for bp in (health.bp, metrics.bp, openapi.bp, keys.bp, users.bp, groups.bp, opinions.bp,
               profiles.bp, populations.bp, models.bp):
        app.register_blueprint(bp)
    app.register_blueprint(experiments.bp)  # A/B tests
    chat.init_app(app)  # chat completions and scores; a served process starts loading the model at once (wsgi.py)
    console.init_app(app)  # the web console under /console
    _trust_proxies(app, settings)
    return app


def _trust_proxies(app: Flask, settings: Settings) -> None:
    """Behind TLS termination (`TRUSTED_PROXIES` proxies) and `up`'s or `serve`'s front (one hop more, which
    appends its peer to X-Forwarded-For): the client's address and scheme from the trusted hops' headers, so
    `request.remote_addr`, the access log and the console's Secure cookie flag are right. Only as many hops
    as are trusted are read: a client cannot spoof them."""
    hops = max(0, settings.trusted_proxies) + (1 if settings.behind_front else 0)
    if hops:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops,  # type: ignore[method-assign]
                                x_proto=max(0, settings.trusted_proxies))
