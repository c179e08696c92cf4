"""Staff roles as permission groups, kept in step with the code after every migrate.

- Operators run the catalogue: hardware tiers, models, versions, prices, and may look at the
  (read-only) payment options. They see predictions (failed ones included, with their event
  log) and may cancel one. They get no access to the ledger.
- Finance reads the ledger and its events, exports it, sees the dashboard and reconciles
  it with the chain (and annotates what does not match), sets the gas rates exports
  convert with, and approves refunds (a payment channel's cooperative refund too). They get no
  access to prices, keys, or predictions' inputs and outputs.
"""

from __future__ import annotations

from typing import Any

OPERATORS = "Operators"
FINANCE = "Finance"

ROLE_PERMISSIONS: dict[str, list[str]] = {
    OPERATORS: [
        "payments.add_hardwaretier",
        "payments.change_hardwaretier",
        "payments.view_hardwaretier",
        "payments.view_pricechange",
        "payments.view_payment_options",
        "payments.view_relayernonce",
        "predictions.add_model",
        "predictions.change_model",
        "predictions.view_model",
        "predictions.add_modelversion",
        "predictions.change_modelversion",
        "predictions.view_modelversion",
        "predictions.view_prediction",
        "predictions.view_predictionevent",
        "predictions.cancel_prediction",
    ],
    FINANCE: [
        "payments.view_payment",
        "payments.view_paymentevent",
        "payments.view_settlementtx",
        "payments.view_relayernonce",
        "payments.export_payment",
        "payments.view_exportjob",
        "payments.view_nativetokenrate",
        "payments.add_nativetokenrate",
        "payments.view_refund",
        "payments.view_refundevent",
        "payments.approve_refund",
        "payments.view_reconciliationnote",
        "payments.add_reconciliationnote",
        "payments.view_channel",
        "payments.view_channelcharge",
        "payments.view_channeltx",
    ],
}


def ensure_roles(**kwargs: Any) -> None:
    from django.contrib.auth.models import Group, Permission

    for name, codes in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=name)
        perms = []
        for code in codes:
            app_label, codename = code.split(".")
            perm = Permission.objects.filter(content_type__app_label=app_label, codename=codename).first()
            if perm is not None:
                perms.append(perm)
        group.permissions.set(perms)
