"""openapi.yaml kept true: schemathesis generates requests for every operation from the
spec, this module signs them as a reseller (docs/api.md section 1) or carries an admin
token, and every answer must be no 5xx and match the spec: status documented, content
type, headers and body schema.

Run by run.sh against a live gateway; CARDGATE_FUZZ_* variables name it and the
credentials it seeded.
"""

import hashlib
import hmac
import os
import secrets
import time
from urllib.parse import urlsplit

import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

BASE = os.environ["CARDGATE_FUZZ_BASE_URL"]
TOKEN = os.environ["CARDGATE_FUZZ_TOKEN"]
KEY_ID = os.environ["CARDGATE_FUZZ_KEY_ID"]
SECRET = os.environ["CARDGATE_FUZZ_SECRET"].encode()
EXAMPLES = int(os.environ.get("CARDGATE_FUZZ_EXAMPLES", "30"))

schema = schemathesis.openapi.from_path(os.path.join(os.path.dirname(__file__), "..", "..", "openapi.yaml"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
session = requests.Session()


def signature_header(method: str, path_url: str, body: bytes) -> str:
    parts = urlsplit(path_url)
    query = "&".join(sorted(parts.query.split("&"))) if parts.query else ""
    ts, nonce = str(int(time.time())), secrets.token_hex(16)
    to_sign = "\n".join(["CG1-HMAC-SHA256", ts, nonce, method, parts.path, query, hashlib.sha256(body).hexdigest()])
    sig = hmac.new(SECRET, to_sign.encode(), hashlib.sha256).hexdigest()
    return f'CG1-HMAC-SHA256 key_id="{KEY_ID}",timestamp="{ts}",nonce="{nonce}",signature="{sig}"'


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_answer_matches_the_spec(case):
    kwargs = case.as_transport_kwargs(base_url=BASE)
    kwargs.pop("timeout", None)
    headers = {k: v for k, v in (kwargs.pop("headers", None) or {}).items() if k.lower() != "authorization"}
    prepared = session.prepare_request(requests.Request(headers=headers, **kwargs))
    path = urlsplit(prepared.url).path
    body = prepared.body or b""
    if isinstance(body, str):
        body = body.encode()
    if path.startswith("/v1/"):
        prepared.headers["Authorization"] = signature_header(prepared.method, prepared.path_url, body)
    elif path.startswith("/admin/") and path != "/admin/v1/login":
        prepared.headers["Authorization"] = f"Bearer {TOKEN}"
    response = session.send(prepared, timeout=30)
    case.validate_response(response, checks=CHECKS)


def test_the_credentials_are_accepted():
    """Otherwise every signed or admin case above would only exercise the 401 path."""
    balance = requests.get(
        BASE + "/v1/balance", headers={"Authorization": signature_header("GET", "/v1/balance", b"")}, timeout=10
    )
    assert balance.status_code == 200, balance.text
    products = requests.get(BASE + "/admin/v1/products", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert products.status_code == 200, products.text
