"""Catalogue admin for operators: models with their effective price, versions, a price preview."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from rest_framework.exceptions import APIException

from payments.models import PriceChange
from payments.permissions import challenge_for
from payments.x402.codec import encode_header
from payments.x402.types import payment_required_v1, payment_required_v2

from .models import Model, ModelVersion, Prediction
from .views import charge_for, example_input, validate_input


class ModelVersionInline(admin.TabularInline):
    model = ModelVersion
    extra = 0
    fields = ("id", "predictor", "created_at")
    readonly_fields = ("created_at",)


class PriceChangeInline(admin.TabularInline):
    model = PriceChange
    extra = 0
    can_delete = False
    fields = readonly_fields = ("changed_at", "changed_by", "old_price", "new_price")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = ("__str__", "effective_price", "price", "hardware", "pricing_mode", "is_free", "preview")
    list_editable = ("price", "hardware")
    list_filter = ("pricing_mode", "is_free", "owner")
    search_fields = ("owner", "name", "description")
    list_select_related = ("hardware",)
    inlines = [ModelVersionInline, PriceChangeInline]
    fieldsets = (
        (None, {"fields": ("owner", "name", "description", "hardware")}),
        (
            "Price per run",
            {
                "fields": (
                    "is_free",
                    "pricing_mode",
                    "price",
                    "expected_seconds",
                    "minimum_price",
                    "markup_percent",
                    "unit_field",
                    "unit_price",
                )
            },
        ),
    )

    @admin.display(description="USDC per run")
    def effective_price(self, obj: Model) -> str:
        return "free" if obj.is_free else f"{obj.price_per_run.normalize():f}"

    @admin.display(description="402 preview")
    def preview(self, obj: Model) -> str:
        return format_html(
            '<a href="{}">preview</a>', reverse("admin:predictions_model_preview", args=[obj.pk])
        )

    def save_model(self, request: HttpRequest, obj: Model, form: Any, change: bool) -> None:
        obj._changed_by = request.user  # type: ignore[attr-defined]
        super().save_model(request, obj, form, change)

    def get_urls(self) -> list:
        return [
            path(
                "<int:pk>/preview/",
                self.admin_site.admin_view(self.preview_view),
                name="predictions_model_preview",
            ),
            *super().get_urls(),
        ]

    def preview_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """The exact 402 challenge an agent would get for this model and an example input."""
        model = get_object_or_404(Model, pk=pk)
        if not self.has_view_permission(request, model):
            raise PermissionDenied
        version = model.latest_version
        example = request.POST.get("input") or json.dumps(example_input(version), indent=2)
        context: dict[str, Any] = {
            **self.admin_site.each_context(request),
            "title": f"402 preview: {model}",
            "model": model,
            "input": example,
            "opts": self.model._meta,
        }
        try:
            inputs = validate_input(version, {"input": json.loads(example)}) if version else None
            if inputs is None:
                raise ValueError("this model has no version yet")
            url = request.build_absolute_uri(f"/v1/models/{model}/predictions")
            charge = charge_for(version, inputs, url, f"/v1/models/{model}/predictions")
            if charge.price <= 0:
                context["free"] = True
            else:
                challenge = challenge_for(charge)
                v2 = payment_required_v2(
                    challenge.requirements, challenge.resource, "PAYMENT-SIGNATURE header is required"
                )
                context.update(
                    price=charge.price,
                    v2=json.dumps(v2, indent=2),
                    v1=json.dumps(
                        payment_required_v1(
                            challenge.requirements, challenge.resource, "X-PAYMENT header is required"
                        ),
                        indent=2,
                    ),
                    header=encode_header(v2),
                )
        except (ValueError, APIException) as exc:
            context["error"] = getattr(exc, "detail", None) or str(exc)
        return TemplateResponse(request, "admin/predictions/model/preview.html", context)


@admin.register(Prediction)
class PredictionAdmin(admin.ModelAdmin):
    list_display = ("id", "model", "status", "created_at", "predict_time", "payment")
    list_filter = ("status", "model")
    search_fields = ("id",)
    readonly_fields = [f.name for f in Prediction._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
