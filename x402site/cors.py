"""CORS for the paid API, so browser agents can send and read the x402 headers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse

ALLOW_HEADERS = (
    "Content-Type, Authorization, PAYMENT-SIGNATURE, X-PAYMENT, Payment-Retry, Prefer, "
    "Cancel-After, Access-Control-Expose-Headers"
)
EXPOSE_HEADERS = "PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE, Location, Retry-After"


class X402CorsMiddleware:
    """Answer preflights and expose the payment headers on ``/v1/`` responses."""

    sync_capable = async_capable = True  # under ASGI, async views stay on the event loop

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        if not request.path.startswith("/v1/"):
            return self.get_response(request)
        return self._expose(self._preflight(request) or self.get_response(request))

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        if not request.path.startswith("/v1/"):
            return await self.get_response(request)
        return self._expose(self._preflight(request) or await self.get_response(request))

    @staticmethod
    def _preflight(request: HttpRequest) -> HttpResponse | None:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response = HttpResponse(status=204)
            response["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response["Access-Control-Allow-Headers"] = ALLOW_HEADERS
            response["Access-Control-Max-Age"] = "600"
            return response
        return None

    @staticmethod
    def _expose(response: HttpResponse) -> HttpResponse:
        response["Access-Control-Allow-Origin"] = "*"
        response["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        return response
