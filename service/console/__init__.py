"""The web console under `/console`: server-rendered pages over the same service functions as the API.

`sessions` signs people in with an API key (a server-side session in Redis, CSRF-protected forms);
`views` holds the pages: profiles, groups and users, experiments and the playground."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    from service.console.views import bp

    app.register_blueprint(bp)
