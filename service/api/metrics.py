"""`GET /metrics`: the Prometheus text of what `service.observability` counts and collects.

The route lives here, beside the other routes, so that `service.observability` (which the rate limiter
calls to count its decisions) imports nothing of the API's routing.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import context
from service.api.errors import ApiError
from service.api.openapi import api_route
from service.observability import EXTENSION, Metrics

bp = Blueprint("observability", __name__)  # the blueprint's name from before the route moved here


@api_route(bp, "/metrics", "GET", summary="Prometheus metrics (behind METRICS_TOKEN when it is set; cross-tenant "
           "counts only then)", auth=False, tag="health", responses={200: "text/plain"}, errors=(401,))
def get_metrics() -> Response:
    token = context.settings().metrics_token
    if token and not hmac.compare_digest(request.headers.get("Authorization", "").encode(),
                                         f"Bearer {token}".encode()):
        raise ApiError(401, "unauthorized", "/metrics needs the metrics token (METRICS_TOKEN) as a bearer key",
                       "Authorization")
    metrics: Metrics = current_app.extensions[EXTENSION]
    return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)
