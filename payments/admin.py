"""Admin for money: the ledger is read-only; tiers are edited by operators; options are shown."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from payments import refunds
from payments.chain.node import ChainUnavailable, rpc
from payments.channels import outbox as channel_outbox
from payments.channels.models import Channel
from payments.finance import export_jobs, ledger_lines, periods, reconciliation, reports
from payments.finance.charts import bar_chart
from payments.finance.reports import DateBasis, LedgerFilter
from payments.forms import ExportForm
from payments.idempotency import redact_payload
from payments.models import (
    ExportDownload,
    ExportJob,
    ExportStatus,
    HardwareTier,
    NativeTokenRate,
    Payment,
    PaymentEvent,
    PriceChange,
    ReconciliationNote,
    Refund,
    RefundEvent,
    RelayerNonce,
    SettlementTx,
)
from payments.options import configured
from payments.x402 import batch_settlement as bs


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
    """Our signed transactions, the outbox (settlements, where a batch carries many payments, and
    refunds); the raw bytes stay out."""

    list_display = ("created_at", "kind", "items", "relayer", "nonce", "tx_hash", "block_number", "gas_used")
    list_filter = ("kind", "network", "relayer")
    search_fields = ("tx_hash", "relayer")
    exclude = ("raw_tx",)
    date_hierarchy = "created_at"


@admin.register(RelayerNonce)
class RelayerLaneAdmin(ReadOnlyAdmin):
    """Our sending accounts (relayer lanes and the refund wallet): a lane flagged "cannot pay"
    had a transaction refused for lack of gas money and takes no new transactions until a
    balance check shows funds (top it up; the reconciler clears the flag)."""

    list_display = ("address", "network", "next_nonce", "unfunded_since", "unfunded_reason")
    list_filter = ("network", ("unfunded_since", admin.EmptyFieldListFilter))
    search_fields = ("address",)


@admin.register(Payment)
class PaymentAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "status",
        "amount_decimal",
        "maximum_decimal",
        "payer",
        "network",
        "settle_tx_hash",
        "confirmations",
    )
    list_filter = ("status", "scheme", "network", "verification", "x402_version")
    search_fields = ("id", "payer", "settle_tx_hash", "nonce")
    date_hierarchy = "created_at"
    inlines = [PaymentEventInline]
    #: Not shown: the payload as received (its payment-identifier is the payer's idempotency
    #: key: with it, anyone could fetch the prediction it bought). Raw transactions live in
    #: SettlementTx, whose admin does not show them either.
    exclude = ("payload",)
    change_list_template = "admin/payments/payment/change_list.html"

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in Payment._meta.fields if f.name not in self.exclude] + ["payload_redacted"]

    @admin.display(description="Payload (payment-identifier redacted)")
    def payload_redacted(self, obj: Payment) -> str:
        return json.dumps(redact_payload(obj.payload), indent=2, sort_keys=True)

    def has_export_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("payments.export_payment")

    def get_urls(self) -> list:
        view = self.admin_site.admin_view
        return [
            path("export/", view(self.export), name="payments_payment_export"),
            path("dashboard/", view(self.dashboard), name="payments_payment_dashboard"),
            path("reconciliation/", view(self.reconciliation), name="payments_payment_reconciliation"),
            *super().get_urls(),
        ]

    def export(self, request: HttpRequest) -> HttpResponse:
        """Start a background export (payments.finance.export_jobs); its page shows the progress."""
        if not self.has_export_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            form = ExportForm(request.POST)
            if form.is_valid():
                job = export_jobs.start(form.ledger_filter(), form.cleaned_data["format"], user=request.user)
                messages.success(request, "Export started: this page shows its progress.")
                return HttpResponseRedirect(reverse("admin:payments_exportjob_change", args=[job.pk]))
        else:
            form = ExportForm(initial=ExportForm.initial_from(request.GET))
        context = {
            **self.admin_site.each_context(request),
            "title": "Export the ledger",
            "form": form,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/payments/export_form.html", context)

    def dashboard(self, request: HttpRequest) -> HttpResponse:
        """Revenue at a glance, for Finance: from the same queries as the exports."""
        if not request.user.has_perm("payments.view_payment"):
            raise PermissionDenied
        days = periods.from_query(request.GET)
        basis = request.GET.get("basis") if request.GET.get("basis") in DateBasis.values else DateBasis.CREATED
        flt = LedgerFilter(since=days.since, until=days.until, basis=basis, tz=days.zone.key, ours_only=True)
        totals = reports.totals(flt)
        revenue = sum(totals.amount(reports.PAID).values(), Decimal(0))
        refunded = reports.refunded(flt)
        by_day = dict(reports.revenue_by_day(flt))
        by_model = reports.revenue_by_model(flt)
        context = {
            **self.admin_site.each_context(request),
            "title": "Revenue",
            "days": days,
            "basis": basis,
            "bases": DateBasis.choices,
            "zones": periods.zone_names(),
            "revenue": revenue,
            "refunded": refunded,
            # The whole ledger's summary, as the export's: another merchant's payment adds
            # its gas (our cost), not its amount.
            "net": ledger_lines.net_total(ledger_lines.summarize(replace(flt, ours_only=False))),
            "pending": sum(totals.amount(reports.PENDING).values(), Decimal(0)),
            "moved_for_others": reports.moved_for_others(flt),
            "by_status": sorted(totals.by_status().items()),
            "lines": totals.lines(),
            # bar_chart escapes every label and value it draws.
            "day_chart": mark_safe(
                bar_chart([(d.isoformat(), by_day.get(d, Decimal(0))) for d in days.days()], unit=" USDC")
            ),
            "model_chart": mark_safe(bar_chart([(m, a) for m, a, _ in by_model], unit=" USDC")),
            "by_model": by_model,
            "attention": reports.needing_attention(flt),
            "usage_priced": reports.usage_priced(flt),
            "channels": reports.channel_figures(flt),
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/payments/dashboard.html", context)

    def reconciliation(self, request: HttpRequest) -> HttpResponse:
        """The ledger beside the chain for a period (payments.finance.reconciliation); finance notes
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


class ExportDownloadInline(admin.TabularInline):
    """Who downloaded the file, and when (read-only)."""

    model = ExportDownload
    fields = readonly_fields = ("at", "user")
    extra = 0
    can_delete = False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("payments.export_payment") or super().has_view_permission(request, obj)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ExportJob)
class ExportJobAdmin(ReadOnlyAdmin):
    """Exports and their audit: progress while one runs, the file while it is kept."""

    list_display = ("created_at", "user", "source", "format", "status", "progress", "expires_at")
    list_filter = ("source", "format", "status")
    fields = readonly_fields = (
        "status",
        "progress",
        "download",
        "created_at",
        "started_at",
        "finished_at",
        "user",
        "source",
        "format",
        "filters",
        "rows",
        "checksum",
        "size",
        "expires_at",
        "error",
    )
    change_form_template = "admin/payments/exportjob/change_form.html"
    inlines = [ExportDownloadInline]

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("payments.export_payment") or super().has_view_permission(request, obj)

    @admin.display(description="Rows done")
    def progress(self, obj: ExportJob) -> str:
        p = export_jobs.progress(obj)
        if p.total is None:
            return f"{p.done}"
        return f"{p.done} of {p.total}" + (f" ({p.percent}%)" if p.percent is not None else "")

    @admin.display(description="File")
    def download(self, obj: ExportJob) -> str:
        if obj.status != ExportStatus.DONE or not obj.file_name:
            return "-"
        url = reverse("admin:payments_exportjob_download", args=[obj.pk])
        return format_html('<a href="{}" id="download">Download {}</a>', url, obj.file_name)

    def get_urls(self) -> list:
        return [
            path(
                "<int:pk>/download/",
                self.admin_site.admin_view(self.download_view),
                name="payments_exportjob_download",
            ),
            *super().get_urls(),
        ]

    def download_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """The file, to its maker, or to a user allowed another's (superuser, or the
        ``download_any_export`` permission); every download is recorded (ExportDownload)."""
        if not request.user.has_perm("payments.export_payment"):
            raise PermissionDenied
        job = ExportJob.objects.filter(pk=pk, status=ExportStatus.DONE).exclude(file_name="").first()
        if job is None or not export_jobs.path_of(job).is_file():
            raise Http404("no such export file (not ready, or expired)")
        if job.user_id != request.user.pk and not request.user.has_perm("payments.download_any_export"):
            raise PermissionDenied
        ExportDownload.objects.create(job=job, user=request.user)
        return FileResponse(export_jobs.path_of(job).open("rb"), as_attachment=True, filename=job.file_name)


class RefundEventInline(PaymentEventInline):
    model = RefundEvent


@admin.register(Refund)
class RefundAdmin(ReadOnlyAdmin):
    """Refunds owed, sent and confirmed; finance approves them here (the signed bytes stay out:
    they are on the refund's outbox row, ``tx``, whose admin does not show them either)."""

    list_display = ("created_at", "status", "amount_decimal", "recipient", "approved_by", "tx_hash", "confirmations")
    list_filter = ("status", "network")
    search_fields = ("recipient", "tx_hash", "payment__id")
    inlines = [RefundEventInline]
    actions = ["approve", "send_again"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in Refund._meta.fields] + ["nonce"]

    def has_approve_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("payments.approve_refund")

    @admin.action(description="Approve selected refunds (the refund wallet sends them)", permissions=["approve"])
    def approve(self, request: HttpRequest, queryset: Any) -> None:
        approved = [refunds.approve(pk, request.user) for pk in queryset.values_list("pk", flat=True)]
        messages.success(request, f"{sum(1 for r in approved if r.approved_by_id == request.user.pk)} refunds approved.")

    @admin.action(description="Send approved refunds again (their send failed)", permissions=["approve"])
    def send_again(self, request: HttpRequest, queryset: Any) -> None:
        queued = sum(refunds.send_again(pk) for pk in queryset.values_list("pk", flat=True))
        messages.success(request, f"{queued} refunds queued to send; others left alone (not approved, or sent).")


@admin.register(Channel)
class ChannelAdmin(ReadOnlyAdmin):
    """Payment channels (``batch-settlement``) as our mirror has them; finance can return a
    channel's unused balance to its payer (the cooperative refund an agent asks for at
    /v1/channels/refund, signed by our receiverAuthorizer, sent by a relayer lane; what we
    charged and did not claim is claimed in the same transaction)."""

    list_display = (
        "channel_id", "payer", "status", "balance", "charged_cumulative", "total_claimed", "refunded", "held_by", "updated_at"
    )
    list_filter = ("status", "network")
    search_fields = ("channel_id", "payer")
    actions = ["refund_unused"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in Channel._meta.fields if f.name != "voucher_signature"]

    def has_approve_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("payments.approve_refund")

    @admin.action(description="Refund the unused balance of selected channels to their payers", permissions=["approve"])
    def refund_unused(self, request: HttpRequest, queryset: Any) -> None:
        for channel_id in queryset.values_list("channel_id", flat=True):
            try:
                tx = channel_outbox.refund_channel(channel_id)
            except (bs.ChannelRejected, ChainUnavailable, LookupError) as exc:
                messages.warning(request, f"{channel_id[:12]}…: not refunded ({exc})")
            else:
                messages.success(request, f"{channel_id[:12]}…: refund sent, transaction {tx.tx_hash}")


@admin.register(NativeTokenRate)
class NativeTokenRateAdmin(admin.ModelAdmin):
    """Gas rates finance sets: added, never edited (the newest of a network applies)."""

    list_display = ("set_at", "network", "symbol", "usd_per_token", "source", "set_by")
    list_filter = ("network",)
    fields = ("network", "symbol", "usd_per_token", "source")

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: NativeTokenRate, form: Any, change: bool) -> None:
        obj.set_by = request.user
        super().save_model(request, obj, form, change)
