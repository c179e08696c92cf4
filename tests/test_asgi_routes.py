"""x402site.asgi: requests that may wait go through Django's ASGI handler (their wait on the
event loop); every other one through the WSGI handler on the process's worker threads."""

from typing import Any

import pytest

from x402site import asgi


def scope(path: str, method: str = "POST", **headers: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }


@pytest.mark.parametrize(
    ("request_scope", "waits"),
    [
        (scope("/v1/models/demo/echo-text/predictions"), False),
        (scope("/v1/predictions"), False),
        (scope("/v1/models/demo/echo-text/predictions", Prefer="wait"), True),
        (scope("/v1/predictions", Prefer="respond-async, WAIT=5"), True),
        (scope("/v1/predictions/abc/stream", "GET"), True),
        (scope("/mcp", "POST"), False),  # a sync view (its tool calls wait on a thread, as before)
        (scope("/healthz", "GET"), False),
        (scope("/v1/predictions/abc", "GET"), False),
        (scope("/no/such/route", "GET"), False),
        ({"type": "websocket", "path": "/v1/predictions", "headers": []}, True),
    ],
)
def test_only_requests_that_may_wait_take_the_asgi_handler(request_scope: dict[str, Any], waits: bool) -> None:
    assert asgi.waits(request_scope) is waits


def test_the_threaded_handler_calls_a_create_views_synchronous_self(rf: Any) -> None:
    """The create views are async only to wait: on a worker thread the view itself runs."""
    from asgiref.sync import iscoroutinefunction

    request = rf.post("/v1/models/demo/echo-text/predictions")
    match = asgi.ThreadedHandler().resolve_request(request)
    assert not iscoroutinefunction(match.func) and match.func.view_class.__name__ == "ModelPredictionCreate"
