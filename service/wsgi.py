"""The WSGI entry point for production servers: `gunicorn service.wsgi:app` (settings from the environment).

Each server process starts loading its model at once, in the background (fetched and converted first on a
fresh home): `/healthz` answers meanwhile, `/readyz` says "loading" and chat requests get 503 with
Retry-After until the engine can serve (`service.engine.client.EngineClient.start_loading`).
"""

from __future__ import annotations

from service import create_app
from service.engine.client import engine_client

app = create_app()
engine_client(app).start_loading()
