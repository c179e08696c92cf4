"""Accounting periods as finance picks them: whole days, first to last inclusive, in a time zone."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

#: The longest range a page shows at once.
MAX_DAYS = 366


@dataclass(frozen=True, slots=True)
class Days:
    first: date
    last: date
    zone: ZoneInfo

    @property
    def since(self) -> datetime:
        return datetime.combine(self.first, time.min, tzinfo=self.zone)

    @property
    def until(self) -> datetime:
        return datetime.combine(self.last + timedelta(days=1), time.min, tzinfo=self.zone)

    def days(self) -> list[date]:
        return [self.first + timedelta(days=i) for i in range((self.last - self.first).days + 1)]

    def query(self) -> str:
        return f"since={self.first.isoformat()}&until={self.last.isoformat()}&tz={self.zone.key}"


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; ValueError if there is none."""
    try:
        return ZoneInfo(name) if name else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone: {name!r}") from None


def from_query(params: Mapping[str, str], *, default_days: int = 30, today: date | None = None) -> Days:
    """The days a page's ``since``/``until``/``tz`` ask for; a bad value falls back to the
    default (the last ``default_days`` days, UTC) rather than failing the page."""
    try:
        tz = zone(params.get("tz", ""))
    except ValueError:
        tz = ZoneInfo("UTC")
    today = today or datetime.now(UTC).astimezone(tz).date()
    try:
        first = (
            date.fromisoformat(params["since"])
            if params.get("since")
            else today - timedelta(default_days - 1)
        )
        last = date.fromisoformat(params["until"]) if params.get("until") else today
    except ValueError:
        first, last = today - timedelta(default_days - 1), today
    last = min(max(last, first), first + timedelta(MAX_DAYS - 1))
    return Days(first, last, tz)


def zone_names() -> list[str]:
    return sorted(available_timezones())
