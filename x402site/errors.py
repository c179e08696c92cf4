"""Django's own error pages as problem+json, like every error of the API (a path no route
matches, a disallowed Host header, a view that failed)."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from .exceptions import problem_response


def bad_request(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return problem_response(400, "The request could not be understood.")


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return problem_response(403, "Forbidden.")


def not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return problem_response(404, "No such resource.")


def server_error(request: HttpRequest) -> JsonResponse:
    return problem_response(500, "Internal error; it has been logged.")
