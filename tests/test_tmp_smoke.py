import pytest_twisted, signal
from autobahn.wamp.types import PublishOptions, CallOptions
from components import uris
from tests.harness import as_device, as_principal, derive_settings, start_storage, start_query, wait_until, Collector

@pytest_twisted.inlineCallbacks
def test_smoke(router, router_settings, tmp_path):
    s = derive_settings(router_settings, tmp_path)
    st = yield start_storage(s)
    q = yield start_query(s)
    try:
        dev = yield as_device(s, "1")
        yield dev.publish(uris.sensor_topic("1","humidity"), [{"value": 1.5+i, "ts": 100.0 + i, "seq": i + 1} for i in range(10)], options=PublishOptions(acknowledge=True))
        reader = yield as_principal(s, "dashboard")
        yield wait_until(lambda: reader.call(uris.GET_MAX_REL_TIME).addCallback(lambda v: v == 109.0), 20)
        print((yield reader.call(uris.FETCH_BETWEEN_WINDOW, 102, 104)))
        print((yield reader.call(uris.LIST_DEVICES)))
        print((yield reader.call(uris.GET_LATEST)))
        print((yield reader.call(uris.AGGREGATE, 100, 110, 5)))
        print((yield reader.call(uris.GET_STATS)))
        chunks = []
        res = yield reader.call(uris.FETCH_ALL, options=CallOptions(on_progress=lambda c: chunks.append(c)))
        print("progress", chunks, res)
        try:
            yield reader.call(uris.FETCH_BETWEEN_WINDOW, 5, 1)
        except Exception as e: print("ERR", e)
        try:
            yield reader.call(uris.GET_AUDIT)
        except Exception as e: print("ERR", e)
        admin = yield as_principal(s, "admin")
        print((yield admin.call(uris.GET_AUDIT)))
    finally:
        st.stop(); q.stop()
        print(q.log()[-3000:])
