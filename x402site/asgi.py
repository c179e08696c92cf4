"""The ASGI application (uvicorn; docs/deploy.md): every route, one server.

Async views (the prediction streams and ``Prefer: wait``, predictions/streams.py) wait on the
event loop, so a listener holds no worker thread; sync views run in threads as under WSGI. MCP's
HTTP+SSE transport (``/mcp/sse`` and ``/mcp/messages/``, mcpserver/sse.py) is served here at
the ASGI level, beside Django. In debug (the quick start) static files are served here too, as
runserver would.
"""

import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "x402site.settings")
# Each request runs its sync code in a thread of its own here: a persistent connection would be
# left behind with every one of those threads (Django's advice: no persistent connections
# under ASGI), and a new connection per request costs a PostgreSQL backend start each time.
# Unless the operator says otherwise, connections come from a pool of the process's own.
os.environ.setdefault("DATABASE_POOL", "true")
django_application = get_asgi_application()

from django.conf import settings  # noqa: E402 (configured by the call above)

from mcpserver import sse  # noqa: E402 (needs the apps loaded)

if settings.DEBUG:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    django_application = ASGIStaticFilesHandler(django_application)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if sse.handles(scope):
        return await sse.app(scope, receive, send)
    return await django_application(scope, receive, send)
