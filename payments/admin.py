"""Admin for money: the ledger is read-only; tiers are edited by operators; options are shown."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path

from .chain import ChainUnavailable, rpc
from .models import HardwareTier, Payment, PaymentEvent, PriceChange
from .options import configured


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
    exclude = ("settle_raw_tx",)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in Payment._meta.fields if f.name != "settle_raw_tx"]


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
