"""The WSGI entry point for production servers: `gunicorn service.wsgi:app` (settings from the environment)."""

from __future__ import annotations

from service import create_app

app = create_app()
