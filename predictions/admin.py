"""Catalogue admin for operators: register a model from its Cog server, edit its runner, schemas
and price (with the exact 402 it will get shown on its page), change prices in bulk, and see
predictions (failed ones included) with their event log."""

from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, ROUND_UP, Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import models, transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from rest_framework.exceptions import APIException

from payments.exceptions import payment_required_response
from payments.models import PriceChange
from payments.permissions import V2_HEADER, challenge_for
from payments.x402.codec import decode_header

from . import lifecycle
from .catalog import version_id
from .models import (
    Model,
    ModelVersion,
    Prediction,
    PredictionEvent,
    PredictionStatus,
    PricingMode,
    validate_server_url,
)
from .runners import cog
from .services import charge_for, example_input, validate_input

USDC = Decimal("0.000001")


def preview_402(request: HttpRequest, model: Model, inputs: Any = None) -> dict[str, Any]:
    """The 402 the next request for ``model`` (with ``inputs``, else an example) will get, built
    by the code that answers the API (charge_for, challenge_for, payment_required_response)."""
    version = model.latest_version
    if version is None:
        return {"error": "This model has no version yet."}
    try:
        chosen = validate_input(version, {"input": example_input(version) if inputs is None else inputs})
        url_path = f"/v1/models/{model}/predictions"
        charge = charge_for(version, chosen, request.build_absolute_uri(url_path), url_path)
        if charge.free:
            return {"free": True, "input": chosen, "input_json": json.dumps(chosen)}
        response = payment_required_response(challenge_for(charge).reject(f"{V2_HEADER} header is required"))
    except APIException as exc:
        return {"error": str(exc.detail)}
    header = response.headers["PAYMENT-REQUIRED"]
    return {
        "input": chosen,
        "input_json": json.dumps(chosen),
        "price": charge.price,
        "v2": json.dumps(decode_header(header), indent=2),
        "v1": json.dumps(response.data, indent=2),
        "header": header,
    }


class ModelVersionForm(forms.ModelForm):
    """A version's runner is checked (its Cog server reached, its predictor imported) when its
    runner settings change, so an outage never blocks editing a price."""

    cog_url = forms.CharField(
        required=False,
        max_length=200,
        validators=[validate_server_url],
        help_text=ModelVersion._meta.get_field("cog_url").help_text,
    )

    class Meta:
        model = ModelVersion
        fields = ("id", "runner", "predictor", "cog_url", "cog_version", "input_schema", "output_schema")

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if not self.errors and {"runner", "predictor", "cog_url"} & set(self.changed_data):
            candidate = ModelVersion(
                runner=data["runner"], predictor=data.get("predictor", ""), cog_url=data.get("cog_url", "")
            )
            try:
                candidate.runner_impl.validate(candidate)
            except ValidationError as exc:
                self.add_error(None, exc)
        return data


class ModelVersionInline(admin.StackedInline):
    model = ModelVersion
    form = ModelVersionForm
    extra = 0
    fields = (
        "id",
        "runner",
        "predictor",
        "cog_url",
        "cog_version",
        "input_schema",
        "output_schema",
        "created_at",
    )
    readonly_fields = ("created_at",)


class PriceChangeInline(admin.TabularInline):
    model = PriceChange
    extra = 0
    can_delete = False
    fields = readonly_fields = ("changed_at", "changed_by", "old_price", "new_price")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class CogRegistrationForm(forms.ModelForm):
    """A new model whose only version runs on a Cog server: its schemas come from the server."""

    cog_url = forms.CharField(
        label="Cog server URL",
        max_length=200,
        validators=[validate_server_url],
        help_text="Its /openapi.json is read for the input and output schemas, e.g. http://gpu-1:5000",
    )

    class Meta:
        model = Model
        fields = (
            "cog_url",
            "owner",
            "name",
            "description",
            "hardware",
            "pricing_mode",
            "price",
            "expected_seconds",
            "settlement_policy",
        )

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        url = (data.get("cog_url") or "").rstrip("/")
        if url:
            try:
                self.schemas = cog.read_schemas(url)
            except cog.SchemaError as exc:
                self.add_error("cog_url", str(exc))
            data["cog_url"] = url
        return data

    def save(self, commit: bool = True) -> Model:
        with transaction.atomic():
            model = super().save()
            input_schema, output_schema = self.schemas
            url = self.cleaned_data["cog_url"]
            ModelVersion.objects.create(
                id=version_id(url, input_schema, output_schema),
                model=model,
                runner=cog.CogRunner.kind,
                cog_url=url,
                input_schema=input_schema,
                output_schema=output_schema,
            )
        return model


class PriceChangeForm(forms.Form):
    """A bulk price change: set a flat price, or raise or lower by a percentage."""

    SET, RAISE, LOWER = "set", "raise", "lower"
    operation = forms.ChoiceField(
        choices=[
            (SET, "Set the flat price per run to (USDC)"),
            (RAISE, "Raise the price by (%)"),
            (LOWER, "Lower the price by (%)"),
        ]
    )
    amount = forms.DecimalField(min_value=Decimal(0), max_digits=20, decimal_places=6)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("operation") == self.LOWER and data.get("amount", 0) >= 100:
            self.add_error("amount", "A price can be lowered by less than 100%.")
        return data

    def apply(self, model: Model) -> str | None:
        """Change ``model`` in memory; None, or why it was left alone."""
        operation, amount = self.cleaned_data["operation"], self.cleaned_data["amount"]
        if operation == self.SET:
            if model.pricing_mode != PricingMode.FLAT:
                return "priced per second: change its tier or expected seconds"
            model.price = amount.quantize(USDC)
            return None
        factor = 1 + (amount if operation == self.RAISE else -amount) / 100
        if model.pricing_mode == PricingMode.FLAT:
            # The whole rule scales: base price, price per unit and floor.
            model.price = (model.price * factor).quantize(USDC, ROUND_HALF_UP)
            model.unit_price = (model.unit_price * factor).quantize(USDC, ROUND_HALF_UP)
        else:
            # The tier's price is shared: this model's markup (which scales the whole rule)
            # carries the change.
            markup = ((1 + model.markup_percent / 100) * factor - 1) * 100
            if markup < 0:
                return (
                    "priced per second with too little markup to lower: change its tier or expected seconds"
                )
            model.markup_percent = markup.quantize(Decimal("0.01"), ROUND_UP)
        model.minimum_price = (model.minimum_price * factor).quantize(USDC, ROUND_HALF_UP)
        return None


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = (
        "__str__",
        "effective_price",
        "price",
        "hardware",
        "pricing_mode",
        "is_free",
        "preview",
    )
    list_editable = ("price", "hardware")
    list_filter = ("pricing_mode", "is_free", "settlement_policy", "owner")
    search_fields = ("owner", "name", "description")
    list_select_related = ("hardware",)
    inlines = [ModelVersionInline, PriceChangeInline]
    actions = ["change_prices"]
    change_list_template = "admin/predictions/model/change_list.html"
    change_form_template = "admin/predictions/model/change_form.html"
    # The links are shown as given; a bare host is read as https.
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    fieldsets = (
        (None, {"fields": ("owner", "name", "description", "hardware", "settlement_policy")}),
        ("Links", {"fields": ("github_url", "paper_url", "license_url", "cover_image_url")}),
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
        ("Pay per second (x402 upto)", {"fields": ("upto_order", "upto_failure_charge")}),
        ("Payment channels (x402 batch-settlement)", {"fields": ("offers_channels",)}),
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

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict | None = None
    ) -> HttpResponse:
        model = self.get_object(request, object_id)
        context = {**(extra_context or {}), "preview_402": preview_402(request, model) if model else None}
        return super().change_view(request, object_id, form_url, context)

    def get_urls(self) -> list:
        view = self.admin_site.admin_view
        return [
            path("<int:pk>/preview/", view(self.preview_view), name="predictions_model_preview"),
            path("add-from-cog/", view(self.add_from_cog), name="predictions_model_add_from_cog"),
            *super().get_urls(),
        ]

    def preview_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """The exact 402 challenge an agent would get for this model and a given input."""
        model = get_object_or_404(Model, pk=pk)
        if not self.has_view_permission(request, model):
            raise PermissionDenied
        context: dict[str, Any] = {
            **self.admin_site.each_context(request),
            "title": f"402 preview: {model}",
            "model": model,
            "opts": self.model._meta,
        }
        try:
            given = json.loads(request.POST["input"]) if request.POST.get("input") else None
        except ValueError as exc:
            context.update(error=f"The input is not JSON: {exc}", input=request.POST["input"])
        else:
            preview = preview_402(request, model, given)
            context.update(preview, input=json.dumps(preview.get("input", given), indent=2))
        return TemplateResponse(request, "admin/predictions/model/preview.html", context)

    def add_from_cog(self, request: HttpRequest) -> HttpResponse:
        """Register a model from a running Cog server: read its schemas, show them, create."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = CogRegistrationForm(request.POST or None)
        if request.method == "POST" and form.is_valid() and "create" in request.POST:
            model = form.save()
            self.log_addition(request, model, [{"added": {}}])
            self.message_user(request, f"{model} registered from {form.cleaned_data['cog_url']}.")
            return HttpResponseRedirect(reverse("admin:predictions_model_change", args=[model.pk]))
        schemas = getattr(form, "schemas", None) if request.method == "POST" and form.is_valid() else None
        context = {
            **self.admin_site.each_context(request),
            "title": "Register a model from a Cog server",
            "form": form,
            "opts": self.model._meta,
            "schemas": {"input": json.dumps(schemas[0], indent=2), "output": json.dumps(schemas[1], indent=2)}
            if schemas
            else None,
        }
        return TemplateResponse(request, "admin/predictions/model/add_from_cog.html", context)

    @admin.action(description="Change prices of the selected models", permissions=["change"])
    def change_prices(self, request: HttpRequest, queryset: Any) -> HttpResponse | None:
        form = PriceChangeForm(request.POST if "apply" in request.POST else None)
        if "apply" in request.POST and form.is_valid():
            changed, skipped = [], []
            for model in queryset.select_related("hardware"):
                reason = form.apply(model)
                try:
                    if reason is None:
                        model.full_clean()
                except ValidationError as exc:
                    reason = "; ".join(exc.messages)
                if reason:
                    skipped.append(f"{model} ({reason})")
                    continue
                model._changed_by = request.user  # type: ignore[attr-defined]
                model.save()  # audited: a PriceChange row per model whose rule changed
                changed.append(str(model))
            if changed:
                self.message_user(request, f"Prices changed: {', '.join(changed)}.")
            if skipped:
                self.message_user(request, f"Left alone: {', '.join(skipped)}.", level=messages.WARNING)
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Change prices",
            "form": form,
            "models": queryset,
            "opts": self.model._meta,
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/predictions/model/change_prices.html", context)


class PredictionEventInline(admin.TabularInline):
    model = PredictionEvent
    extra = 0
    can_delete = False
    fields = readonly_fields = ("created_at", "from_status", "to_status", "cause", "detail")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Prediction)
class PredictionAdmin(admin.ModelAdmin):
    """Read-only: a prediction changes only through its lifecycle (here: the cancel action)."""

    list_display = ("id", "model", "status", "created_at", "predict_time", "settlement_policy", "payment")
    list_filter = ("status", "settlement_policy", "model")
    # By id, or by the exact ref an export names (accountants see refs, never ids).
    search_fields = ("id", "=ref")
    date_hierarchy = "created_at"
    list_select_related = ("model", "payment")
    readonly_fields = [f.name for f in Prediction._meta.fields]
    inlines = [PredictionEventInline]
    actions = ["cancel_predictions"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("predictions.cancel_prediction")

    @admin.action(description="Cancel the selected predictions", permissions=["cancel"])
    def cancel_predictions(self, request: HttpRequest, queryset: Any) -> None:
        ended = [
            lifecycle.cancel(pk, cause=lifecycle.Cause.ADMIN, detail={"user": request.user.get_username()})
            for pk in queryset.values_list("pk", flat=True)
        ]
        canceled = sum(p.status == PredictionStatus.CANCELED for p in ended)
        self.message_user(request, f"{canceled} canceled; finished ones left alone.")
