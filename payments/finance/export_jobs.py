"""Ledger exports as background jobs: started from the admin, run by a Celery worker, their
progress in the cache while they run, their files kept for ``X402_EXPORT_TTL_HOURS``.

The job row is the audit record (who, when, filters, rows, checksum); the file is deleted when
it expires, the record stays.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.core.cache import cache
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from payments.finance import exports, xlsx
from payments.finance.reports import LedgerFilter
from payments.models import ExportJob, ExportStatus
from x402site import dispatch
from x402site.conf import x402

log = logging.getLogger("payments.finance.exports")

WRITERS = {ExportJob.Format.CSV: exports.write_zip, ExportJob.Format.XLSX: xlsx.write_xlsx}
SUFFIX = {ExportJob.Format.CSV: ".zip", ExportJob.Format.XLSX: ".xlsx"}
#: An export's progress in the cache outlives any export.
PROGRESS_TTL = 6 * 3600
#: A running job started this long ago has lost its worker (a million rows take seconds).
ABANDONED_AFTER = timedelta(hours=1)


def progress_key(job_id: int) -> str:
    """Where a running job reports its progress (its page reads it)."""
    return f"x402:export-progress:{job_id}"


@dataclass(frozen=True, slots=True)
class Progress:
    done: int
    total: int | None

    @property
    def percent(self) -> int | None:
        if not self.total:
            return None
        return min(100, round(100 * self.done / self.total))


def progress(job: ExportJob) -> Progress:
    """Rows done of total: live from the cache while the job runs, else from its record."""
    if job.status == ExportStatus.RUNNING:
        live = cache.get(progress_key(job.pk))
        if live:
            return Progress(*live)
    return Progress(job.rows, job.rows_total)


def start(flt: LedgerFilter, fmt: str, *, user: Any) -> ExportJob:
    """Record the job and queue it once its record is committed."""
    if fmt not in WRITERS:
        raise ValueError(f"unknown export format: {fmt!r}")
    job = ExportJob.objects.create(
        user=user if getattr(user, "is_authenticated", False) else None,
        source=ExportJob.Source.ADMIN,
        format=fmt,
        filters=flt.as_dict(),
    )
    transaction.on_commit(lambda: dispatch.send(dispatch.RUN_EXPORT, job.pk))
    return job


def path_of(job: ExportJob) -> Path:
    return Path(x402.finance.export_dir) / job.file_name


def run(job_id: int) -> ExportJob:
    """Write a queued job's file (the task's body). A job another worker runs is left alone,
    unless it started so long ago (``ABANDONED_AFTER``) that its worker died: the broker hands
    the task out again (it is acknowledged late) and this run takes it over."""
    now = timezone.now()
    claimed = (
        ExportJob.objects.filter(pk=job_id)
        .filter(Q(status=ExportStatus.QUEUED) | Q(status=ExportStatus.RUNNING, started_at__lt=now - ABANDONED_AFTER))
        .update(status=ExportStatus.RUNNING, started_at=now)
    )
    job = ExportJob.objects.get(pk=job_id)
    if not claimed:
        return job
    flt = LedgerFilter.from_dict(job.filters)
    folder = Path(x402.finance.export_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"ledger-{timezone.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}{SUFFIX[job.format]}"

    def report(done: int, total: int) -> None:
        cache.set(progress_key(job.pk), (done, total), PROGRESS_TTL)

    try:
        result = WRITERS[job.format](flt, folder / name, report)
    except Exception as exc:
        (folder / name).unlink(missing_ok=True)
        log.exception("export %s failed", job.pk)
        ExportJob.objects.filter(pk=job.pk).update(
            status=ExportStatus.FAILED, finished_at=timezone.now(), error=f"{exc.__class__.__name__}: {exc}"[:2000]
        )
        raise
    finally:
        cache.delete(progress_key(job.pk))
    now = timezone.now()
    ExportJob.objects.filter(pk=job.pk).update(
        status=ExportStatus.DONE,
        rows=result.rows,
        rows_total=result.rows,
        finished_at=now,
        file_name=name,
        size=(folder / name).stat().st_size,
        checksum=exports.sha256_of(folder / name),
        expires_at=now + timedelta(hours=x402.finance.export_ttl_hours),
    )
    job.refresh_from_db()
    log.info("export %s: %s rows in %s", job.pk, job.rows, name)
    return job


def expire() -> int:
    """Delete the files of jobs past their expiry (the records stay); how many."""
    done = 0
    for job in ExportJob.objects.filter(status=ExportStatus.DONE, expires_at__lte=timezone.now()):
        if job.file_name:
            path_of(job).unlink(missing_ok=True)
        ExportJob.objects.filter(pk=job.pk, status=ExportStatus.DONE).update(status=ExportStatus.EXPIRED, file_name="")
        done += 1
    return done


def record_command(flt: LedgerFilter, fmt: str, result: exports.Result, checksum: str) -> ExportJob:
    """The audit record of a command-line export (its file is where the user put it)."""
    now = timezone.now()
    return ExportJob.objects.create(
        source=ExportJob.Source.COMMAND,
        format=fmt,
        filters=flt.as_dict(),
        status=ExportStatus.DONE,
        rows=result.rows,
        rows_total=result.rows,
        started_at=now,
        finished_at=now,
        checksum=checksum,
    )
