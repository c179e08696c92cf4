"""Static files (admin, API docs) in production, served by WhiteNoise, without costing the API.

WhiteNoise's middleware is synchronous only. Under ASGI (how the service is deployed) one
synchronous middleware makes Django run the whole middleware chain in a worker thread and come
back to the event loop for the (async) create views: two more thread hops on every request,
static or not (measured: about a fifth of the web process's time on a 402 challenge). This
subclass answers static paths as WhiteNoise does and passes every other request on in the
caller's mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse
from whitenoise.middleware import WhiteNoiseMiddleware


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise, sync and async capable."""

    sync_capable = async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        super().__init__(get_response)
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def _static_file(self, request: HttpRequest) -> Any:
        if self.autorefresh:
            return self.find_file(request.path_info)
        return self.files.get(request.path_info)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        return super().__call__(request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        static_file = self._static_file(request)
        if static_file is not None:  # opening the file may block: not on the event loop
            return await sync_to_async(self.serve, thread_sensitive=False)(static_file, request)
        return await self.get_response(request)
