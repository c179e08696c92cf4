"""Bad input and attacks: fuzzed headers and API, binding to the resource, rate limits, secrets.

Run alone with ``pytest -m security``. docs/security.md maps each threat to its test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging

import pytest
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payments.models import Payment
from payments.options import payment_options
from payments.x402.codec import DecodeError, decode_header, encode_header
from payments.x402.exact import verify_exact
from payments.x402.types import PaymentOption, Requirement, parse_payload
from payments.x402.verify import PaymentRejected
from tests.payers import sign_authorization, v2_header, v2_payload

pytestmark = pytest.mark.security
URL = "/v1/models/demo/echo-text/predictions"
OPTION = PaymentOption(
    chain_id=31337,
    asset="0x5FbDB2315678afecb367f032d93F642f64180aa3",
    asset_name="USD Coin",
    asset_version="2",
    pay_to="0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
)
REQ = Requirement(OPTION, 10_000)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def _pure_path(header: str) -> None:
    """Every outcome is a value or one of the two refusals, never another exception."""
    with contextlib.suppress(DecodeError, PaymentRejected):
        verify_exact(parse_payload(decode_header(header)), [REQ], 1_800_000_000)


@settings(max_examples=1500, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_header_text(header: str) -> None:
    _pure_path(header)


@settings(max_examples=1500, deadline=None)
@given(json_values)
def test_fuzz_header_json(value: object) -> None:
    _pure_path(base64.b64encode(json.dumps(value).encode()).decode())


@settings(max_examples=800, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["from", "to", "value", "validAfter", "validBefore", "nonce", "x"]),
        json_values,
        max_size=7,
    ),
    st.one_of(st.text(max_size=140), json_values),
)
def test_fuzz_authorization_fields(auth: dict, signature: object) -> None:
    """Near-valid payloads: the right shape with hostile field values."""
    obj = v2_payload(REQ, sign_authorization("0x" + "11" * 32, REQ))
    obj["payload"]["authorization"].update(auth)
    obj["payload"]["signature"] = signature
    _pure_path(encode_header(obj))


@pytest.mark.django_db(transaction=True)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()))
def test_fuzz_the_api_never_answers_5xx(chain_settings, demo_model, header: str) -> None:
    from django.core.cache import cache

    cache.clear()  # no rate limit between examples
    try:
        response = Client().post(
            URL,
            data=json.dumps({"input": {"text": "x"}}),
            content_type="application/json",
            headers={"PAYMENT-SIGNATURE": header},
        )
    except ValueError:  # the test client refuses header values HTTP cannot carry
        return
    assert response.status_code in (400, 402), (response.status_code, response.content[:300])


#: Text as an attacker writes it: any character (NUL and other controls too), digits of other
#: scripts, numbers of thousands of digits, and the formats our headers expect.
hostile_text = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=60),
    st.sampled_from(["\x00", "\u00b2", "\u0663", "9" * 5000, "1e400", "wait=" + "9" * 400, "1h" * 300, "-1"]),
    st.integers().map(str),
    st.from_regex(r"(wait(=[0-9]{1,6})?|[0-9]{1,12}(h|m|s|ms)?|Bearer .{0,20})", fullmatch=True),
)
HEADERS = ["PAYMENT-SIGNATURE", "X-PAYMENT", "Prefer", "Cancel-After", "Authorization", "X-Forwarded-For"]
hostile_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | hostile_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(hostile_text, children, max_size=3),
    max_leaves=12,
)
OPERATOR = "fuzz-operator-token"


def _fuzz_client(settings) -> Client:  # type: ignore[no-untyped-def]
    from django.core.cache import cache

    cache.clear()  # no rate limit between examples
    settings.X402_OPERATOR_TOKENS = [OPERATOR]
    return Client()


def _no_5xx(response) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code < 500, (response.status_code, response.content[:300])
    if 400 <= response.status_code < 500 and response.status_code != 402:
        assert response["Content-Type"] == "application/problem+json", response.content[:300]


@pytest.fixture
def quiet_runs(monkeypatch):  # type: ignore[no-untyped-def]
    """Accepted predictions are recorded, not run, and Prefer: wait does not wait."""
    monkeypatch.setattr("predictions.scheduling.start_prediction", lambda prediction: None)
    monkeypatch.setattr("predictions.views.MAX_WAIT", 0, raising=False)


@pytest.mark.django_db(transaction=True)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.dictionaries(st.sampled_from(HEADERS), hostile_text, min_size=1), operator=st.booleans())
def test_fuzz_every_header_we_read(chain_settings, demo_model, quiet_runs, settings, headers, operator) -> None:
    client = _fuzz_client(settings)
    if operator:
        headers.setdefault("Authorization", f"Bearer {OPERATOR}")
    body = json.dumps({"input": {"text": "x"}})
    _no_5xx(client.post(URL, data=body, content_type="application/json", headers=headers))
    listing = {"SIGN-IN-WITH-X": headers.get("PAYMENT-SIGNATURE", ""), **headers}
    _no_5xx(client.get("/v1/predictions", headers=listing))


@pytest.mark.django_db(transaction=True)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["input", "text", "webhook", "webhook_events_filter", "stream", "version", "body"]),
    value=hostile_json,
    operator=st.booleans(),
)
def test_fuzz_every_body_field(chain_settings, demo_model, quiet_runs, settings, field, value, operator) -> None:
    client = _fuzz_client(settings)
    body: object = {"input": {"text": "x"}}
    if field == "text":
        body = {"input": {"text": value}}
    elif field == "version":
        body = {"version": value, "input": {"text": "x"}}
    elif field == "body":
        body = value
    else:
        body = {"input": {"text": "x"}, field: value}
    path = "/v1/predictions" if field == "version" else URL
    try:
        data = json.dumps(body)
    except ValueError:  # an integer beyond Python's 4,300 digits: json.dumps cannot write it
        return
    headers = {"Authorization": f"Bearer {OPERATOR}"} if operator else {}
    _no_5xx(client.post(path, data=data, content_type="application/json", headers=headers))


@pytest.mark.django_db(transaction=True)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segment=hostile_text.filter(bool), cursor=hostile_text)
def test_fuzz_path_parameters_and_cursors(chain_settings, demo_model, settings, segment, cursor) -> None:
    from urllib.parse import quote

    client = _fuzz_client(settings)
    seg = quote(segment.encode("utf-8", "surrogatepass")[:2000], safe="")
    for method, path in [
        ("get", f"/v1/models/{seg}/echo-text"),
        ("get", f"/v1/models/demo/{seg}"),
        ("get", f"/v1/models/{seg}/echo-text/versions"),
        ("get", f"/v1/models/demo/echo-text/versions/{seg}"),
        ("get", f"/v1/collections/{seg}"),
        ("get", f"/v1/predictions/{seg}"),
        ("post", f"/v1/predictions/{seg}/cancel"),
        ("post", f"/v1/models/demo/{seg}/predictions"),
        ("post", f"/internal/cog/{seg}/{seg}"),
        ("get", f"/v1/models?cursor={quote(cursor.encode('utf-8', 'surrogatepass'), safe='')}"),
        ("get", "/v1/models?cursor=" + quote(base64.b64encode(f"o=0&p={cursor}".encode("utf-8", "surrogatepass")))),
    ]:
        response = client.post(path, "{}", "application/json") if method == "post" else client.get(path)
        _no_5xx(response)
    headers = {"Authorization": f"Bearer {OPERATOR}"}
    raw = base64.b64encode(f"o=1&r=1&p={cursor}".encode("utf-8", "surrogatepass")).decode()
    _no_5xx(client.get("/v1/predictions", {"cursor": raw}, headers=headers))


@pytest.mark.django_db(transaction=True)
def test_huge_and_hostile_requests(chain_settings, demo_model) -> None:
    for header in [
        "A" * (8 * 1024 + 1),
        "A" * (64 * 1024),
        encode_header({"x": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]}),
    ]:
        response = Client().post(
            URL,
            data=json.dumps({"input": {"text": "x"}}),
            content_type="application/json",
            headers={"PAYMENT-SIGNATURE": header},
        )
        assert response.status_code == 402 and response.json()["error"] == "invalid_payload"
    big = Client().post(
        URL, data=json.dumps({"input": {"text": "x" * 3_000_000}}), content_type="application/json"
    )
    assert big.status_code == 413 and big["Content-Type"] == "application/problem+json"
    weird = Client().post(URL, data='{"input": {"text": "\\u202e evil"}}', content_type="application/json")
    assert weird.status_code == 402
    for unstorable in ('{"input": {"text": "\\ud800"}}', '{"input": {"text": "a\\u0000"}}'):
        refused = Client().post(URL, data=unstorable, content_type="application/json")
        assert refused.status_code == 400 and refused.json()["status"] == 400
    floats = Client().post(URL, data='{"input": {"text": 1e400}}', content_type="application/json")
    assert floats.status_code in (400, 422)


@pytest.mark.django_db(transaction=True)
def test_a_payment_for_one_resource_is_refused_on_another(chain_settings, demo_model) -> None:
    from predictions.models import Model, ModelVersion

    other = Model.objects.create(owner="demo", name="other", price="0.01")
    ModelVersion.objects.create(
        id="0" * 64,
        model=other,
        predictor="predictions.runners.demo.EchoText",
        input_schema=demo_model.latest_version.input_schema,
    )
    req = Requirement(payment_options()[0], 10_000)
    key = chain_settings.payers[0]["private_key"]
    payload = v2_payload(req, sign_authorization(key, req), resource_url="http://testserver" + URL)
    response = Client().post(
        "/v1/models/demo/other/predictions",
        data=json.dumps({"input": {"text": "x"}}),
        content_type="application/json",
        headers={"PAYMENT-SIGNATURE": encode_header(payload)},
    )
    assert response.status_code == 402 and response.json()["error"] == "invalid_payment_resource_mismatch"
    assert Payment.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_rate_limits_on_challenges_and_failed_payments(chain_settings, demo_model, settings) -> None:
    settings.X402_RATE_LIMITS = {"challenge": "3/60", "failed": "2/60"}
    body = json.dumps({"input": {"text": "x"}})
    codes = [Client().post(URL, data=body, content_type="application/json").status_code for _ in range(4)]
    assert codes == [402, 402, 402, 429]
    limited = Client().post(URL, data=body, content_type="application/json")
    assert limited.status_code == 429 and int(limited["Retry-After"]) >= 1 and limited.json()["status"] == 429
    bad = [
        Client()
        .post(URL, data=body, content_type="application/json", headers={"PAYMENT-SIGNATURE": "garbage"})
        .status_code
        for _ in range(3)
    ]
    assert bad == [402, 402, 429]
    other_client = Client(REMOTE_ADDR="10.9.8.7").post(URL, data=body, content_type="application/json")
    assert other_client.status_code == 402  # limits are per client


@pytest.mark.django_db(transaction=True)
def test_the_relayer_key_never_leaks(chain_settings, demo_model, eager_celery, caplog, settings) -> None:
    from django.contrib.auth.models import User

    from payments.roles import ensure_roles

    ensure_roles()
    key = chain_settings.relayer_private_key.removeprefix("0x")
    caplog.set_level(logging.DEBUG)
    header = v2_header(chain_settings.payers[1]["private_key"], Requirement(payment_options()[0], 10_000))
    paid = Client().post(
        URL,
        data=json.dumps({"input": {"text": "x"}}),
        content_type="application/json",
        headers={"PAYMENT-SIGNATURE": header},
    )
    assert paid.status_code == 201
    admin = User.objects.create_superuser("root", "r@x", "pw")
    client = Client()
    client.force_login(admin)
    payment = Payment.objects.get()
    pages = [
        f"/admin/payments/payment/{payment.pk}/change/",
        "/admin/payments/hardwaretier/payment-options/",
        "/admin/payments/payment/export/",
        "/admin/payments/payment/reconciliation/",
        "/readyz",
        "/openapi.json",
        "/facilitator/supported",
        f"/v1/predictions/{paid.json()['id']}",
        "/v1/models",
        "/discovery/resources",
        "/metrics",
    ]
    for page in pages:
        response = client.get(page)
        content = b"".join(response.streaming_content) if response.streaming else response.content
        assert key.encode() not in content.lower(), page
    assert key not in caplog.text.lower()
    assert key not in json.dumps(list(Payment.objects.values())[0], default=str).lower()
