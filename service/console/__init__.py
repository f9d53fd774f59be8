"""The web console under `/console`: server-rendered pages over the same service functions as the API.

`sessions` signs people in with an API key (a server-side session in Redis, CSRF-protected forms);
`views` holds the pages: profiles, groups and users, populations, experiments and the playground.
`root` sends a browser at the server's root (`/`) to the console and serves `/favicon.ico`."""

from __future__ import annotations

from flask import Blueprint, Flask, redirect, url_for
from werkzeug.wrappers import Response

# Pages outside /console (not API operations: `service.api.openapi.PAGE_BLUEPRINTS`).
root = Blueprint("console_root", __name__)


@root.get("/")
def index() -> Response:
    return redirect(url_for("console.index"))


@root.get("/favicon.ico")
def favicon() -> Response:
    from service.console.views import bp

    response = bp.send_static_file("favicon.ico")
    response.headers["Cache-Control"] = "public, max-age=86400"
    return response


def init_app(app: Flask) -> None:
    from service.console.views import bp

    app.register_blueprint(bp)
    app.register_blueprint(root)
