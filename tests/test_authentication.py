"""Bearer tokens are one class (x402site.authentication.BearerToken) parameterised by the setting
that lists them: the same rules (scheme case-insensitive, constant-time compare, unknown tokens
unauthenticated rather than refused) for operators, facilitator clients and ops."""

import pytest
from django.test import Client, override_settings

from x402site.authentication import BearerToken, FacilitatorToken, OperatorToken, OpsToken

TOKEN = "a-long-random-token"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_facilitator_api_takes_its_token_in_any_scheme_case(db, scheme: str) -> None:
    with override_settings(X402_FACILITATOR_TOKENS=[TOKEN]):
        response = Client().get("/facilitator/supported", headers={"Authorization": f"{scheme} {TOKEN}"})
    assert response.status_code == 200, response.content


def test_a_facilitator_token_is_not_an_operator_token_and_the_reverse(db) -> None:
    with override_settings(X402_FACILITATOR_TOKENS=["fac"], X402_OPERATOR_TOKENS=["op"]):
        assert Client().get("/facilitator/supported", headers={"Authorization": "Bearer op"}).status_code == 403
        account = Client().get("/v1/account", headers={"Authorization": "Bearer fac"})
        assert account.status_code == 401  # not the operator: a payer must sign in
        assert Client().get("/v1/account", headers={"Authorization": "Bearer op"}).json()["username"]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "Token", "token"])
def test_the_operator_token_in_the_schemes_the_replicate_client_sends(db, scheme: str) -> None:
    with override_settings(X402_OPERATOR_TOKENS=[TOKEN]):
        response = Client().get("/v1/account", headers={"Authorization": f"{scheme} {TOKEN}"})
    assert response.status_code == 200, response.content
    assert response.json()["type"] == "organization"


@pytest.mark.parametrize("header", ["bearer ops-secret", "Bearer ops-secret"])
def test_ops_token_in_any_scheme_case(db, header: str) -> None:
    with override_settings(X402_OPS_TOKENS=["ops-secret"]):
        assert Client(REMOTE_ADDR="203.0.113.9").get("/metrics", headers={"Authorization": header}).status_code == 200
        assert Client(REMOTE_ADDR="203.0.113.9").get("/metrics", headers={"Authorization": "Token ops-secret"}).status_code != 200


def test_one_class_for_every_token() -> None:
    assert all(issubclass(c, BearerToken) for c in (OperatorToken, FacilitatorToken, OpsToken))
    assert len({c.setting for c in (OperatorToken, FacilitatorToken, OpsToken)}) == 3
