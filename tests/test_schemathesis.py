"""schemathesis against our own OpenAPI schema: generated requests, zero server errors."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from x402site.wsgi import application

schema = schemathesis.openapi.from_wsgi("/openapi.json", application)

pytestmark = pytest.mark.security


@pytest.mark.django_db(transaction=True)
@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, chain_settings, demo_model) -> None:
    from django.core.cache import cache

    cache.clear()
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
