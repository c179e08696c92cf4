"""schemathesis against our own OpenAPI schema: generated requests, zero server errors.

Every operation gets valid and invalid requests (wrong types, missing and extra fields), with
NUL and any other UTF-8 character allowed in strings: bodies, path parameters, query strings
and each documented header (PAYMENT-SIGNATURE, X-PAYMENT, Prefer, Cancel-After, Authorization,
SIGN-IN-WITH-X).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from x402site.wsgi import application

schema = schemathesis.openapi.from_wsgi("/openapi.json", application)
schema.config.generation.update(modes=["positive", "negative"], allow_x00=True, codec="utf-8")

pytestmark = pytest.mark.security


@pytest.mark.django_db(transaction=True)
@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, chain_settings, demo_model, monkeypatch) -> None:
    from django.core.cache import cache

    cache.clear()
    monkeypatch.setattr("predictions.scheduling.start_prediction", lambda prediction: None)
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
