"""ragapi's app without its middleware, started by ``ragapi serve`` itself.

The benchmark compares GET /api/v1/health here and on the full server: the same routes, the same
handler, the same uvicorn options (whatever ``impl.cli.serve`` passes), so the difference is what
the middleware (RequestContext: request id, body cap, security headers, the access log line and
the metrics) costs per request. Run it as ``python -m scripts.bench.bare_app`` with RAGAPI_*
settings in the environment.
"""

from __future__ import annotations

from fastapi import FastAPI

from impl import cli
from impl.api import app as app_module
from impl.settings import Settings

_create_app = app_module.create_app


def create_app_without_middleware(settings: Settings | None = None) -> FastAPI:
    app = _create_app(settings)
    # Starlette builds its middleware stack from this list on the first request.
    app.user_middleware.clear()
    return app


if __name__ == "__main__":
    # serve() imports create_app from impl.api.app when it runs, so it finds this one.
    app_module.create_app = create_app_without_middleware
    raise SystemExit(cli.main(["serve"]))
