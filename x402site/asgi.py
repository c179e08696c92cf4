"""The ASGI application (uvicorn; docs/deploy.md): every route, one server.

Two ways through Django, chosen per request:

- A request that may wait (``Prefer: wait`` on a create, a prediction's stream, MCP's
  streamable HTTP) goes through Django's ASGI handler: its wait happens on the event loop, so a
  listener holds no worker thread. MCP's HTTP+SSE transport (``/mcp/sse`` and
  ``/mcp/messages/``, mcpserver/sse.py) is served here at the ASGI level, beside Django.
- Every other request (the 402 challenge, the paid create, reads) is answered by Django's WSGI
  handler on a worker thread of a fixed pool (a2wsgi): one thread hop per request. Django's ASGI
  handler makes three or four (the request signals, the view, the response's close) and starts a
  thread per request; measured on 2 cores, that plumbing alone cost about 3 ms a request
  (``/healthz``: 3.8 ms under the ASGI handler, 0.8 ms under gunicorn).

In debug (the quick start) static files are served here too, as runserver would.
"""

import gc
import os
from typing import Any

from django.core.asgi import get_asgi_application
from django.core.handlers.wsgi import WSGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "x402site.settings")
# Unless the operator says otherwise, connections come from a pool of the process's own: the
# worker threads (and the ASGI handler's thread per request) take one for a request and give it
# back at its end.
os.environ.setdefault("DATABASE_POOL", "true")
django_application = get_asgi_application()

from a2wsgi import WSGIMiddleware  # noqa: E402
from asgiref.sync import iscoroutinefunction  # noqa: E402
from django.conf import settings  # noqa: E402 (configured by the call above)
from django.urls import Resolver404, ResolverMatch, resolve  # noqa: E402

from mcpserver import sse  # noqa: E402 (needs the apps loaded)


class ThreadedHandler(WSGIHandler):
    """Django's WSGI handler, calling a create view's synchronous self (``sync_view``): the
    view is asynchronous only to wait for ``Prefer: wait``, which this handler never gets."""

    def resolve_request(self, request: Any) -> ResolverMatch:
        match = super().resolve_request(request)
        match.func = getattr(match.func, "sync_view", match.func)
        return match


#: X402_WEB_THREADS: the worker threads answering the non-waiting requests of one process.
THREADS = int(os.environ.get("X402_WEB_THREADS", "16"))
threaded_application = WSGIMiddleware(ThreadedHandler(), workers=THREADS)

if settings.DEBUG:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    django_application = ASGIStaticFilesHandler(django_application)


def waits(scope: dict[str, Any]) -> bool:
    """Whether the request may wait: ``Prefer: wait``, or a view that is asynchronous for
    another reason than such a wait (a stream, MCP). Static files in debug: the ASGI handler."""
    if scope["type"] != "http":
        return True
    for name, value in scope["headers"]:
        if name == b"prefer" and b"wait" in value.lower():
            return True
    path = scope["path"]
    if settings.DEBUG and path.startswith(settings.STATIC_URL):
        return True
    try:
        view = resolve(path).func
    except Resolver404:
        return False
    return iscoroutinefunction(view) and not hasattr(view, "sync_view")


# What start-up loaded (Django, the apps, the libraries) lives as long as the process: out of the
# collector's sight, so that collections scan only what requests allocate.
gc.collect()
gc.freeze()


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if sse.handles(scope):
        return await sse.app(scope, receive, send)
    if waits(scope):
        return await django_application(scope, receive, send)
    return await threaded_application(scope, receive, send)
