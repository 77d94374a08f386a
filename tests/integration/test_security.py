"""One test per denial, against the real router: each refusal is wamp.error.not_authorized (or the HTTP
equivalent), and the allowed action beside it works. Every test runs in both router layouts: the router
worker holding the web transport (``router.proxy_workers`` 0), and two proxy workers holding it."""

from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import json
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import PublishOptions, RegisterOptions, SubscribeOptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nacl.signing import SigningKey
from twisted.internet import threads

from components.ops.bridge_client import sign
from components.ops.credentials import CredentialStore
from components.ops.router_config import http_base
from components.wamp import uris
from components.wamp.connection import device_auth, ticket_auth
from tests.support.harness import (
    REPO,
    RouterProcess,
    as_device,
    as_principal,
    derive_settings,
    free_port,
    open_session,
    stack_settings,
    start_query,
    start_storage,
    wait_until,
)

ACK = PublishOptions(acknowledge=True)
NOT_AUTHORIZED = "wamp.error.not_authorized"
LAYOUTS = {"router_worker": 0, "two_proxy_workers": 2}


@pytest.fixture(scope="module", params=list(LAYOUTS.values()), ids=list(LAYOUTS))
def proxy_workers(request: pytest.FixtureRequest) -> int:
    """The layout under test: how many proxy workers hold the web transport."""
    return int(request.param)


@pytest.fixture(scope="module")
def router_settings(proxy_workers: int, tmp_path_factory: pytest.TempPathFactory):
    """This module's router of each layout in turn (it replaces the session's router for these tests)."""
    return stack_settings(tmp_path_factory.mktemp(f"security{proxy_workers}"),
                          overrides={"router": {"proxy_workers": proxy_workers}})


@pytest.fixture(scope="module")
def router(router_settings):
    """A real router of the layout under test."""
    proc = RouterProcess(router_settings).start()
    try:
        yield proc
    finally:
        proc.stop()


def refusal(failure_value: Exception) -> str:
    """The error URI (or the abort reason) of a refused call or login."""
    if isinstance(failure_value, ApplicationError):
        return failure_value.error
    return str(failure_value)


@pytest_twisted.inlineCallbacks
def test_an_anonymous_session_is_refused_and_a_ticket_session_is_accepted(router, router_settings) -> None:
    with pytest.raises(Exception) as err:
        yield open_session(router_settings, {})
    assert "wamp.error" in str(err.value) and ("not_authorized" in str(err.value) or "no_auth" in str(err.value))
    reader = yield as_principal(router_settings, "dashboard")
    yield reader.close()


@pytest_twisted.inlineCallbacks
def test_a_wrong_device_key_or_ticket_is_refused(router, router_settings) -> None:
    wrong_key = bytes(SigningKey.generate()).hex()
    with pytest.raises(Exception) as err:
        yield open_session(router_settings, device_auth("1", wrong_key))
    assert NOT_AUTHORIZED in str(err.value) and "not its own" in str(err.value)
    with pytest.raises(Exception) as err:
        yield open_session(router_settings, ticket_auth("dashboard", "not-the-ticket"))
    assert NOT_AUTHORIZED in str(err.value)
    with pytest.raises(Exception) as err:
        yield open_session(router_settings, device_auth("999", wrong_key))
    assert "not provisioned" in str(err.value)
    device = yield as_device(router_settings, "1")
    yield device.close()


@pytest_twisted.inlineCallbacks
def test_a_device_cannot_publish_as_another_device_and_nothing_is_stored(running_stack) -> None:
    reader = running_stack.reader
    a = yield running_stack.device("1")
    with pytest.raises(ApplicationError) as err:
        yield a.publish(uris.sensor_topic("2", "humidity"), {"value": 1.0, "ts": 1.0}, options=ACK)
    assert err.value.error == NOT_AUTHORIZED
    with pytest.raises(ApplicationError) as err:
        yield a.subscribe(lambda *x: None, uris.ack_topic("2"))
    assert err.value.error == NOT_AUTHORIZED
    yield a.publish(uris.sensor_topic("1", "humidity"), {"value": 2.0, "ts": 2.0}, options=ACK)  # its own
    yield a.subscribe(lambda *x: None, uris.ack_topic("1"))
    yield wait_until(lambda: reader.call(uris.GET_STATS).addCallback(lambda st: st["stored"] == 1), 20)
    stored = yield reader.call(uris.FETCH_ALL)
    assert [(r["device_id"], r["value"]) for r in stored] == [("1", 2.0)]


@pytest_twisted.inlineCallbacks
def test_a_device_cannot_call_query_procedures(router, router_settings) -> None:
    device = yield as_device(router_settings, "0")
    try:
        for procedure in (uris.FETCH_ALL, uris.GET_STATS, uris.GET_AUDIT):
            with pytest.raises(ApplicationError) as err:
                yield device.call(procedure)
            assert err.value.error == NOT_AUTHORIZED
    finally:
        yield device.close()


@pytest_twisted.inlineCallbacks
def test_a_reader_cannot_read_the_audit_log_but_an_admin_can(router, router_settings, tmp_path) -> None:
    s = derive_settings(router_settings, tmp_path)
    query = yield start_query(s)
    reader = yield as_principal(s, "dashboard")
    admin = yield as_principal(s, "admin")
    try:
        with pytest.raises(ApplicationError) as err:
            yield reader.call(uris.GET_AUDIT)
        assert err.value.error == NOT_AUTHORIZED
        assert (yield reader.call(uris.GET_MAX_REL_TIME)) is None
        entries = yield admin.call(uris.GET_AUDIT)
        assert any(e["procedure"] == uris.GET_MAX_REL_TIME and e["authid"] == "dashboard" for e in entries)
    finally:
        yield reader.close()
        yield admin.close()
        query.stop()


@pytest_twisted.inlineCallbacks
def test_nobody_else_can_register_a_query_procedure(router, router_settings, tmp_path) -> None:
    s = derive_settings(router_settings, tmp_path)
    query = yield start_query(s)
    rogues = [(yield as_principal(s, "dashboard")), (yield as_principal(s, "admin")), (yield as_device(s, "2"))]
    try:
        for rogue in rogues:
            # joining the callees' shared registration is the way to hijack calls: refused
            with pytest.raises(ApplicationError) as err:
                yield rogue.register(lambda *a, **kw: ["hijacked"], uris.FETCH_ALL,
                                     options=RegisterOptions(invoke="roundrobin"))
            assert err.value.error == NOT_AUTHORIZED
            # a procedure of the namespace nobody serves yet: refused too
            with pytest.raises(ApplicationError) as err:
                yield rogue.register(lambda *a, **kw: None, "iot.fetch_everything")
            assert err.value.error == NOT_AUTHORIZED
            # a single registration over the shared one: refused as well (Crossbar reports the policy clash
            # rather than the authorization, but registers nothing)
            with pytest.raises(ApplicationError) as err:
                yield rogue.register(lambda *a, **kw: ["hijacked"], uris.FETCH_ALL)
            assert err.value.error in (NOT_AUTHORIZED, "wamp.error.procedure_exists_with_different_invocation_policy")
        answer = yield rogues[0].call(uris.FETCH_ALL)
        assert answer == []  # still the real callee
    finally:
        for rogue in rogues:
            yield rogue.close()
        query.stop()


@pytest_twisted.inlineCallbacks
def test_a_query_callee_may_register_query_procedures_and_nothing_else(router, router_settings) -> None:
    query = yield as_principal(router_settings, "query")
    device = yield as_device(router_settings, "0")
    acks = []
    yield device.subscribe(lambda payload: acks.append(payload), uris.ack_topic("0"))
    try:
        # the allowed neighbour: a procedure of the query namespace
        registration = yield query.register(lambda: "probe", "iot.fetch_probe", options=RegisterOptions(
            invoke="roundrobin"))
        yield registration.unregister()
        # a forged ack would make device 0 drop readings that were never stored
        with pytest.raises(ApplicationError) as err:
            yield query.publish(uris.ack_topic("0"), {"seq": 1_000_000_000}, options=ACK)
        assert err.value.error == NOT_AUTHORIZED
        for denied in (lambda: query.publish(uris.sensor_topic("0", "humidity"), {"value": 1.0, "ts": 1.0},
                                             options=ACK),
                       lambda: query.subscribe(lambda *a: None, uris.SENSOR_PREFIX,
                                               options=SubscribeOptions(match="prefix")),
                       lambda: query.subscribe(lambda *a: None, uris.ack_topic("0")),
                       lambda: query.register(lambda: None, "iot.ack.0"),
                       lambda: query.register(lambda: None, "iot.sensor.0.humidity"),
                       lambda: query.register(lambda: None, "iot.storage_probe"),
                       lambda: query.call(uris.GET_MAX_REL_TIME)):
            with pytest.raises(ApplicationError) as err:
                yield denied()
            assert err.value.error == NOT_AUTHORIZED
        assert acks == []
    finally:
        yield query.close()
        yield device.close()


@pytest_twisted.inlineCallbacks
def test_storage_may_subscribe_to_readings_and_publish_acks_and_nothing_else(router, router_settings) -> None:
    storage = yield as_principal(router_settings, "storage")
    try:
        subscription = yield storage.subscribe(lambda *a, **kw: None, uris.SENSOR_PREFIX,
                                               options=SubscribeOptions(match="prefix"))
        yield subscription.unsubscribe()
        yield storage.publish(uris.ack_topic("0"), {"seq": 0}, options=ACK)
        for denied in (lambda: storage.register(lambda: None, "iot.fetch_probe",
                                                options=RegisterOptions(invoke="roundrobin")),
                       lambda: storage.publish(uris.sensor_topic("0", "humidity"), {"value": 1.0, "ts": 1.0},
                                               options=ACK),
                       lambda: storage.call(uris.GET_MAX_REL_TIME)):
            with pytest.raises(ApplicationError) as err:
                yield denied()
            assert err.value.error == NOT_AUTHORIZED
    finally:
        yield storage.close()


def test_a_query_principal_of_an_older_version_gets_the_query_role_and_keeps_its_ticket(tmp_path) -> None:
    store = CredentialStore(tmp_path)
    ticket = store.add_principal("query", "storage")  # as older versions created it
    done = store.ensure_local()
    assert "role of query changed from storage to query" in done
    principal = store.principals()["query"]
    assert principal.role == "query" and principal.accepts(ticket)
    assert not any("role of" in d for d in store.ensure_local())  # once


@pytest_twisted.inlineCallbacks
def test_a_revoked_device_is_disconnected_and_refused(router, router_settings) -> None:
    store = CredentialStore(router_settings.paths.secrets_dir)
    store.add_device("revokee")  # no router restart needed
    device = yield as_device(router_settings, "revokee")
    left = []
    device.component.on("leave", lambda session, details: left.append(details.reason))
    yield device.publish(uris.sensor_topic("revokee", "humidity"), {"value": 1.0, "ts": 1.0}, options=ACK)
    result = yield threads.deferToThread(
        subprocess.run, [sys.executable, "-m", "components", "--config", router_settings.config_path, "device",
                         "revoke", "revokee"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    yield wait_until(lambda: left, 10, message="the revoked device's session to be closed")
    with pytest.raises(Exception) as err:
        yield as_device(router_settings, "revokee")
    assert NOT_AUTHORIZED in str(err.value) and "revoked" in str(err.value)
    other = yield as_device(router_settings, "0")  # other devices are unaffected
    yield other.close()


FAR_CLIENT = "127.0.0.2"
"""A loopback address outside the bridge's allow-list (127.0.0.1/32, ::1/128): a client "from elsewhere"."""


def post_from(source: str, url: str, payload: dict, signing: dict | None = None) -> tuple[int, object]:
    """POST ``payload`` as JSON from the local address ``source`` (signed when ``signing`` is given)."""
    body = json.dumps(payload).encode()
    parts = urllib.parse.urlsplit(url)
    target = parts.path
    if signing is not None:
        target += "?" + urllib.parse.urlencode(sign(signing["key"], signing["secret"], body))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30, source_address=(source, 0))
    try:
        conn.request("POST", target, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read().decode()
    finally:
        conn.close()
    try:
        return response.status, json.loads(text) if text else None
    except json.JSONDecodeError:
        return response.status, text


def reading_publish(device: str = "14") -> dict:
    return {"topic": uris.sensor_topic(device, "humidity"), "args": [{"value": 99, "ts": 1500052521}]}


def test_the_http_bridge_refuses_clients_outside_its_allow_list_and_unsigned_requests_when_signing_is_on(
        tmp_path, proxy_workers) -> None:
    for mode in ("loopback", "signed"):
        s = stack_settings(tmp_path / mode, overrides={"router": {"http_bridge": mode, "proxy_workers": proxy_workers}})
        proc = RouterProcess(s).start()
        try:
            base = http_base(s)
            status, answer = post_from(FAR_CLIENT, f"{base}/publish", reading_publish())
            assert status in (400, 401), f"{mode}: unsigned publish from {FAR_CLIENT} got {status}"
            reason = "based on IP" if mode == "loopback" else "signature"
            assert reason in answer["error"], answer  # refused for the reason the mode gives, not by accident
            status, _ = post_from(FAR_CLIENT, f"{base}/call", {"procedure": uris.GET_MAX_REL_TIME})
            assert status in (400, 401), f"{mode}: unsigned call from {FAR_CLIENT} got {status}"
            if mode == "loopback":
                status, answer = post_from("127.0.0.1", f"{base}/publish", reading_publish())
                assert status == 200 and "id" in answer  # the allowed neighbour
            else:
                status, _ = post_from("127.0.0.1", f"{base}/publish", reading_publish())
                assert status in (400, 401)  # unsigned is refused from anywhere
                secret = CredentialStore(s.paths.secrets_dir).bridge_secret()
                status, answer = post_from(FAR_CLIENT, f"{base}/publish", reading_publish(), signing=secret)
                assert status == 200 and "id" in answer
                bad = dict(secret, secret="wrong")
                status, _ = post_from(FAR_CLIENT, f"{base}/publish", reading_publish(), signing=bad)
                assert status == 401
        finally:
            proc.stop()


def self_signed(path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = path / "cert.pem", path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest_twisted.inlineCallbacks
def test_one_setting_turns_on_tls_for_the_web_transport(tmp_path, proxy_workers) -> None:
    cert, key = self_signed(tmp_path)
    port = free_port()
    s = stack_settings(tmp_path / "tls", port, {"router": {
        "tls_cert": str(cert), "tls_key": str(key), "tls_trust_root": str(cert),
        "url": f"wss://localhost:{port}/ws", "proxy_workers": proxy_workers}})
    proc = RouterProcess(s).start()
    try:
        device = yield as_device(s, "0")  # wss:// with the self-signed certificate trusted
        yield device.publish(uris.sensor_topic("0", "humidity"), {"value": 1.0, "ts": 1.0}, options=ACK)
        yield device.close()
        context = ssl.create_default_context(cafile=str(cert))
        page = yield threads.deferToThread(
            lambda: urllib.request.urlopen(f"https://localhost:{port}/", context=context, timeout=10).read())
        assert b"<html" in page.lower()
        with pytest.raises(RuntimeError, match="refused or lost"):  # plain ws:// no longer works
            yield open_session(derive_plain(s, port), device_auth("0", CredentialStore(
                s.paths.secrets_dir).device_key("0")))
    finally:
        proc.stop()


def derive_plain(s, port):
    from dataclasses import replace

    return replace(s, router=replace(s.router, url=f"ws://127.0.0.1:{port}/ws", tls_trust_root=None))


@pytest_twisted.inlineCallbacks
def test_secrets_never_appear_in_logs_config_or_git(tmp_path, proxy_workers) -> None:
    s = stack_settings(tmp_path, overrides={"router": {"proxy_workers": proxy_workers}})
    proc = RouterProcess(s).start()
    storage = yield start_storage(s)
    query = yield start_query(s)
    try:
        reader = yield as_principal(s, "dashboard")
        device = yield as_device(s, "1")
        yield device.publish(uris.sensor_topic("1", "humidity"), {"value": 3.0, "ts": 3.0}, options=ACK)
        yield wait_until(lambda: reader.call(uris.GET_STATS).addCallback(lambda st: st["stored"] == 1), 20)
        with pytest.raises(RuntimeError, match="not_authorized"):
            yield open_session(s, ticket_auth("dashboard", "wrong-ticket-guess"))
        yield reader.close()
        yield device.close()
    finally:
        query.stop()
        storage.stop()
        proc.stop()
    store = CredentialStore(s.paths.secrets_dir)
    secrets = [store.ticket(a) for a in ("storage", "query", "dashboard", "admin")]
    secrets += [store.device_key("1"), store.bridge_secret()["secret"]]
    keys = json.loads(Path(s.keys.file).read_text())["keys"]
    secrets += list(keys.values()) + [base64.b64decode(k).hex() for k in keys.values()]
    logs = "".join(p.read_text(errors="replace") for p in Path(s.paths.run_dir).rglob("*.log"))
    assert "storage subscribed" in logs and "query callee registered" in logs
    committed = subprocess.run(["git", "ls-files", "-z"], capture_output=True, cwd=REPO, check=True).stdout
    tracked = b"".join((REPO / name).read_bytes() for name in committed.decode().split("\0")
                       if name and (REPO / name).is_file())
    for secret in secrets:
        assert secret not in logs
        assert secret.encode() not in tracked
    assert b"var/" not in committed and not any(n.startswith("var/") for n in committed.decode().split("\0"))
