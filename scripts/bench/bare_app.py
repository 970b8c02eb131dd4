"""ragapi's app without its middleware, served exactly as ``ragapi serve`` serves it.

The benchmark compares GET /api/v1/health here and on the full server: the same routes, the same
handler, the same uvicorn settings, so the difference is what RequestContext (request id, body
cap, security headers, the access log line and the metrics) costs per request. Run it as
``python -m scripts.bench.bare_app`` with RAGAPI_* settings in the environment.
"""

from __future__ import annotations

import uvicorn

from impl.api.app import create_app
from impl.settings import Settings


def main() -> None:
    settings = Settings()
    app = create_app(settings)
    # Starlette builds its middleware stack from this list on the first request.
    app.user_middleware.clear()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        server_header=False,
    )


if __name__ == "__main__":
    main()
