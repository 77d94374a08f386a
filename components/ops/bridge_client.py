"""Requests to the router's HTTP bridge (``/call``, ``/publish``), signed when the bridge requires it.

Crossbar's scheme: query parameters ``key``, ``timestamp`` (UTC, ``%Y-%m-%dT%H:%M:%S.%fZ``), ``seq``,
``nonce`` and ``signature`` = base64url(HMAC-SHA256(secret, key | timestamp | seq | nonce | body)).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import secrets
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

_SEQ = 0


class BridgeUnreachable(Exception):
    """Nothing answered at the bridge's URL (refused, unknown host, timeout)."""


def sign(key: str, secret: str, body: bytes) -> dict[str, str]:
    """The query parameters that sign ``body`` with the bridge's key and secret."""
    global _SEQ
    _SEQ += 1
    timestamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    seq, nonce = str(_SEQ), str(secrets.randbelow(2**53))
    mac = hmac.new(secret.encode(), None, hashlib.sha256)
    for part in (key.encode(), timestamp.encode(), seq.encode(), nonce.encode(), body):
        mac.update(part)
    return {"key": key, "timestamp": timestamp, "seq": seq, "nonce": nonce,
            "signature": base64.urlsafe_b64encode(mac.digest()).decode()}


def post(url: str, payload: dict[str, Any], signing: dict[str, str] | None = None, timeout: float = 30.0
         ) -> tuple[int, Any]:
    """POST ``payload`` as JSON (signed when ``signing`` holds key and secret); return (status, JSON answer)."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    body = json.dumps(payload).encode()
    if signing is not None:
        url = f"{url}?{urllib.parse.urlencode(sign(signing['key'], signing['secret'], body))}"
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) URL we built
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise BridgeUnreachable(f"no answer from the HTTP bridge at {url.split('?')[0]} ({reason})") from None
    try:
        return status, json.loads(text) if text else None
    except json.JSONDecodeError:
        return status, text
