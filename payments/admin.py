"""Admin for money: the ledger is read-only; tiers are edited by operators; options are shown."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import FileResponse, HttpRequest, HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.utils.safestring import mark_safe

from . import periods, reconciliation, reports
from .chain import ChainUnavailable, rpc
from .charts import bar_chart
from .exports import Export
from .idempotency import redact_payload
from .models import (
    HardwareTier,
    LedgerExport,
    Payment,
    PaymentEvent,
    PriceChange,
    ReconciliationNote,
    SettlementTx,
)
from .options import configured
from .reports import LedgerFilter


class ReadOnlyAdmin(admin.ModelAdmin):
    """Money records are written by the state machine only, never by a form."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class PaymentEventInline(admin.TabularInline):
    model = PaymentEvent
    extra = 0
    can_delete = False
    fields = readonly_fields = ("created_at", "from_status", "to_status", "detail")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(SettlementTx)
class SettlementTxAdmin(ReadOnlyAdmin):
    """Our signed settlement transactions (a batch carries many payments); the raw bytes stay out."""

    list_display = ("created_at", "kind", "items", "relayer", "nonce", "tx_hash", "block_number", "gas_used")
    list_filter = ("kind", "network", "relayer")
    search_fields = ("tx_hash", "relayer")
    exclude = ("raw_tx",)
    date_hierarchy = "created_at"


@admin.register(Payment)
class PaymentAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "status",
        "amount_decimal",
        "payer",
        "network",
        "settle_tx_hash",
        "confirmations",
    )
    list_filter = ("status", "network", "verification", "x402_version")
    search_fields = ("id", "payer", "settle_tx_hash", "nonce")
    date_hierarchy = "created_at"
    inlines = [PaymentEventInline]
    #: Not shown: the payload as received (its payment-identifier is the payer's idempotency
    #: key: with it, anyone could fetch the prediction it bought). Raw transactions live in
    #: SettlementTx, whose admin does not show them either.
    exclude = ("payload",)
    actions = ["export_csv", "export_xlsx"]
    change_list_template = "admin/payments/payment/change_list.html"

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in Payment._meta.fields if f.name not in self.exclude] + ["payload_redacted"]

    @admin.display(description="Payload (payment-identifier redacted)")
    def payload_redacted(self, obj: Payment) -> str:
        return json.dumps(redact_payload(obj.payload), indent=2, sort_keys=True)

    def has_export_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("payments.export_payment")

    @admin.action(description="Export selected payments (CSV)", permissions=["export"])
    def export_csv(self, request: HttpRequest, queryset: Any) -> HttpResponse:
        return self._export(request, queryset, "csv", {"selected": queryset.count()})

    @admin.action(description="Export selected payments (XLSX)", permissions=["export"])
    def export_xlsx(self, request: HttpRequest, queryset: Any) -> HttpResponse:
        return self._export(request, queryset, "xlsx", {"selected": queryset.count()})

    def get_urls(self) -> list:
        view = self.admin_site.admin_view
        return [
            path("export/<str:fmt>/", view(self.export_matching), name="payments_payment_export"),
            path("dashboard/", view(self.dashboard), name="payments_payment_dashboard"),
            path("reconciliation/", view(self.reconciliation), name="payments_payment_reconciliation"),
            *super().get_urls(),
        ]

    def export_matching(self, request: HttpRequest, fmt: str) -> HttpResponse:
        """Everything the changelist shows with its current filters and search, not one page."""
        if fmt not in ("csv", "xlsx") or not self.has_export_permission(request):
            raise PermissionDenied
        queryset = self.get_changelist_instance(request).get_queryset(request)
        return self._export(request, queryset, fmt, {"changelist": request.GET.urlencode()})

    def _export(self, request: HttpRequest, queryset: Any, fmt: str, filters: dict) -> HttpResponse:
        export = Export(queryset, fmt=fmt, user=request.user, source="admin", filters=filters)
        stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
        if fmt == "csv":
            response = StreamingHttpResponse(export.csv(), content_type="text/csv; charset=utf-8")
            response["Content-Disposition"] = f'attachment; filename="ledger-{stamp}.csv"'
            return response
        with tempfile.NamedTemporaryFile(suffix=".xlsx", delete=False) as handle:
            path_ = Path(handle.name)
        export.xlsx(path_)
        stream = path_.open("rb")
        path_.unlink()  # the open handle keeps the data until the response is sent
        return FileResponse(
            stream,
            as_attachment=True,
            filename=f"ledger-{stamp}.xlsx",
            content_type="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        )

    def dashboard(self, request: HttpRequest) -> HttpResponse:
        """Revenue at a glance, for Finance: from the same queries as the exports."""
        if not request.user.has_perm("payments.view_payment"):
            raise PermissionDenied
        today = timezone.now().date()
        try:
            since = (
                date.fromisoformat(request.GET["since"])
                if request.GET.get("since")
                else today - timedelta(29)
            )
            until = date.fromisoformat(request.GET["until"]) if request.GET.get("until") else today
        except ValueError:
            since, until = today - timedelta(days=29), today
        until = max(until, since)
        flt = LedgerFilter(
            since=datetime.combine(since, time.min, tzinfo=UTC),
            until=datetime.combine(until + timedelta(days=1), time.min, tzinfo=UTC),
        )
        totals = reports.totals(flt)
        by_day = dict(reports.revenue_by_day(flt))
        days = [since + timedelta(days=i) for i in range(min((until - since).days, 366) + 1)]
        by_model = reports.revenue_by_model(flt)
        context = {
            **self.admin_site.each_context(request),
            "title": "Revenue",
            "since": since,
            "until": until,
            "revenue": sum(totals.amount(reports.PAID).values(), Decimal(0)),
            "pending": sum(totals.amount(reports.PENDING).values(), Decimal(0)),
            "by_status": sorted(totals.by_status().items()),
            "lines": totals.lines(),
            # bar_chart escapes every label and value it draws.
            "day_chart": mark_safe(
                bar_chart([(d.isoformat(), by_day.get(d, Decimal(0))) for d in days], unit=" USDC")
            ),
            "model_chart": mark_safe(bar_chart([(m, a) for m, a, _ in by_model], unit=" USDC")),
            "by_model": by_model,
            "attention": reports.needing_attention(flt),
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/payments/dashboard.html", context)


    def reconciliation(self, request: HttpRequest) -> HttpResponse:
        """The ledger beside the chain for a period (payments.reconciliation); finance notes
        why an unmatched line is so."""
        if not request.user.has_perm("payments.view_payment"):
            raise PermissionDenied
        params = request.POST if request.method == "POST" else request.GET
        days = periods.from_query(params, default_days=1)
        network = params.get("network", "")
        if request.method == "POST":
            if not request.user.has_perm("payments.add_reconciliationnote"):
                raise PermissionDenied
            try:
                reconciliation.annotate(request.POST.get("key", ""), request.POST.get("reason", ""), author=request.user)
            except ValueError as exc:
                messages.error(request, str(exc))
            else:
                messages.success(request, "Note recorded.")
            return HttpResponseRedirect(f"{request.path}?{days.query()}&network={network}")
        context: dict[str, Any] = {
            **self.admin_site.each_context(request),
            "title": "Reconciliation with the chain",
            "days": days,
            "network": network,
            "networks": sorted({c.option.network for c in configured()}),
            "zones": periods.zone_names(),
            "statuses": reconciliation.LineStatus,
            "opts": self.model._meta,
            "can_note": request.user.has_perm("payments.add_reconciliationnote"),
        }
        try:
            context["report"] = reconciliation.report(reconciliation.Period(days.since, days.until), network=network)
        except ChainUnavailable as exc:
            context["chain_error"] = str(exc)
        return TemplateResponse(request, "admin/payments/reconciliation.html", context)


@admin.register(ReconciliationNote)
class ReconciliationNoteAdmin(ReadOnlyAdmin):
    """Notes are written from the reconciliation page, never edited."""

    list_display = ("created_at", "author", "payment", "tx_hash", "log_index", "reason")
    search_fields = ("tx_hash", "reason")


@admin.register(PaymentEvent)
class PaymentEventAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "payment", "from_status", "to_status")
    list_filter = ("to_status",)


@admin.register(HardwareTier)
class HardwareTierAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "price_per_second", "price_per_hour", "active")
    list_editable = ("price_per_second", "active")
    search_fields = ("slug", "name")
    list_filter = ("active",)

    @admin.display(description="USDC per hour")
    def price_per_hour(self, obj: HardwareTier) -> str:
        return f"{obj.price_per_second * 3600:.2f}"

    def save_model(self, request: HttpRequest, obj: HardwareTier, form: Any, change: bool) -> None:
        obj._changed_by = request.user  # type: ignore[attr-defined]
        super().save_model(request, obj, form, change)

    def get_urls(self) -> list:
        return [
            path("payment-options/", self.admin_site.admin_view(self.options_view), name="payment-options"),
            *super().get_urls(),
        ]

    def options_view(self, request: HttpRequest) -> HttpResponse:
        """The accepted payment options: read-only, they come from the environment."""
        if not request.user.has_perm("payments.view_payment_options"):
            raise PermissionDenied
        rows = []
        for c in configured():
            try:
                has_code = rpc(c.rpc_url, "eth_getCode", [c.option.asset, "latest"], timeout=3) not in (
                    "0x",
                    None,
                )
            except (ChainUnavailable, Exception):  # noqa: BLE001 - shown to the operator, not raised
                has_code = None
            rows.append(
                {"option": c.option, "facilitator": c.facilitator_url or "own relayer", "has_code": has_code}
            )
        context = {**self.admin_site.each_context(request), "title": "Payment options", "rows": rows}
        return TemplateResponse(request, "admin/payments/payment_options.html", context)


@admin.register(PriceChange)
class PriceChangeAdmin(ReadOnlyAdmin):
    list_display = ("changed_at", "model", "old_price", "new_price", "tier", "changed_by")
    list_filter = ("tier",)
    search_fields = ("model__owner", "model__name")
    fields = readonly_fields = ("changed_at", "model", "tier", "changed_by", "old_rule", "new_rule")


@admin.register(LedgerExport)
class LedgerExportAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "user", "source", "format", "rows", "finished_at")
    list_filter = ("source", "format")
    fields = readonly_fields = ("created_at", "finished_at", "user", "source", "format", "rows", "filters")
