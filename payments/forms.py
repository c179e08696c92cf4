"""Forms of the finance pages: bad input is shown back on the form, never a server error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django import forms

from payments.finance import periods
from payments.finance.reports import DateBasis, LedgerFilter
from payments.models import ExportJob, PaymentStatus
from payments.options import configured


class ExportForm(forms.Form):
    format = forms.ChoiceField(choices=ExportJob.Format.choices, initial=ExportJob.Format.CSV)
    basis = forms.ChoiceField(label="Period by", choices=DateBasis.choices, initial=DateBasis.MONEY)
    since = forms.DateField(label="From (first day)", required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(label="To (last day)", required=False, widget=forms.DateInput(attrs={"type": "date"}))
    tz = forms.CharField(label="Time zone", initial="UTC", help_text="IANA name, e.g. Europe/Paris")
    statuses = forms.MultipleChoiceField(
        choices=PaymentStatus.choices, required=False, widget=forms.CheckboxSelectMultiple, help_text="none: all"
    )
    network = forms.ChoiceField(required=False)
    model = forms.CharField(required=False, help_text="owner/name")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        networks = sorted({c.option.network for c in configured()})
        self.fields["network"].choices = [("", "all"), *[(n, n) for n in networks]]

    def clean_tz(self) -> str:
        try:
            return periods.zone(self.cleaned_data["tz"]).key
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("since") and data.get("until") and data["until"] < data["since"]:
            raise forms.ValidationError("The last day comes before the first.")
        return data

    def ledger_filter(self) -> LedgerFilter:
        data = self.cleaned_data
        zone = periods.zone(data["tz"])
        first, last = data.get("since"), data.get("until")
        return LedgerFilter(
            since=periods.Days(first, first, zone).since if first else None,
            until=periods.Days(last, last, zone).until if last else None,
            statuses=tuple(data.get("statuses") or ()),
            model=data.get("model", ""),
            network=data.get("network", ""),
            basis=data["basis"],
            tz=zone.key,
        )

    @classmethod
    def initial_from(cls, params: Mapping[str, str]) -> dict[str, Any]:
        """Initial values from a page's query (the dashboard's period, the changelist's filters)."""
        initial: dict[str, Any] = {k: params[k] for k in ("since", "until", "tz", "basis", "network", "model") if params.get(k)}
        if params.get("status__exact"):
            initial["statuses"] = [params["status__exact"]]
        if params.get("network__exact"):
            initial["network"] = params["network__exact"]
        return initial
