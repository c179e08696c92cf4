"""Cursor pagination that refuses a forged cursor instead of handing it to the database."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from rest_framework import pagination
from rest_framework.exceptions import NotFound


class CursorPagination(pagination.CursorPagination):
    """DRF's cursor pagination; a cursor's position must be a value of the ordering field.

    A cursor is base64 the client may write itself: ``p=garbage`` on a date ordering, or a NUL
    on a text one, would otherwise fail in the query (a 500). Such a cursor is "Invalid
    cursor" (404), as DRF answers for the cursors it can tell are broken.
    """

    def paginate_queryset(self, queryset: Any, request: Any, view: Any = None) -> Any:
        self.model = queryset.model
        return super().paginate_queryset(queryset, request, view)

    def decode_cursor(self, request: Any) -> pagination.Cursor | None:
        cursor = super().decode_cursor(request)
        if cursor is None or cursor.position is None:
            return cursor
        ordering = self.ordering if isinstance(self.ordering, str) else self.ordering[0]
        field = self.model._meta.get_field(ordering.lstrip("-"))
        try:
            value = field.to_python(cursor.position)
        except (ValidationError, ValueError, OverflowError):
            raise NotFound(self.invalid_cursor_message) from None
        if isinstance(value, str) and "\x00" in value:
            raise NotFound(self.invalid_cursor_message)
        return cursor
