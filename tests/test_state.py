"""The state store, on SQLite and on this machine's PostgreSQL."""

import uuid

import pytest

from aggregator.state import StateUnavailable, UpdateRecord, open_store
from edge_sdk.protocol.errors import Refusal, RefusedMessage


def postgres_url():
    try:
        import psycopg

        url = "postgresql://postgres@127.0.0.1:5432/test"
        psycopg.connect(url, connect_timeout=2).close()
        return url
    except Exception:
        return None


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(str(tmp_path / "state.db"))
    else:
        url = postgres_url()
        if url is None:
            pytest.skip("no PostgreSQL at 127.0.0.1:5432")
        import psycopg

        schema = f"t_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        s = open_store(f"{url}?options=-csearch_path%3D{schema}")
    yield s
    s.close()


def record(device, rnd=1, cluster=0):
    return UpdateRecord(rnd, cluster, device, b"delta", 10, 0.5, 0)


def test_updates_are_accepted_once(store):
    store.open_round(1, 0, deadline=1e12)
    assert store.accept_update(record("a")) is True
    assert store.accept_update(record("a")) is False  # a QoS-1 duplicate, or a replaced worker
    assert [u.device_id for u in store.updates(1, 0)] == ["a"]


def test_updates_for_a_closed_or_unknown_round_are_refused(store):
    store.open_round(1, 0, deadline=1e12)
    store.save_clusters({0: (None, b"adapter", 0)}, {"a": 0})
    store.close_round(1, 0, b"new", 1, {"accepted": []})
    with pytest.raises(ValueError):
        store.accept_update(record("late"))
    with pytest.raises(ValueError):
        store.accept_update(record("x", rnd=9))


def test_closing_a_round_writes_adapter_and_state_together(store):
    store.save_clusters({0: (b"c", b"adapter-v0", 0)}, {"a": 0, "b": 0})
    store.open_round(1, 0, deadline=1e12)
    store.close_round(1, 0, b"adapter-v1", 1, {"accepted": ["a"]})
    assert store.clusters()[0] == (b"c", b"adapter-v1", 1)
    assert store.rounds("open") == []
    assert store.round_summaries() == [(1, 0, {"accepted": ["a"]})]


def test_enrolment_is_idempotent_and_ids_cannot_be_stolen(store):
    store.add_token("tok")
    store.enrol("d1", b"v" * 32, b"b" * 32, "pi", "tok")
    store.enrol("d1", b"v" * 32, b"b" * 32, "pi", "tok")  # a lost ack: enrolling again changes nothing
    with pytest.raises(RefusedMessage) as refused:
        store.enrol("d1", b"x" * 32, b"b" * 32, "pi", "tok")
    assert refused.value.reason == Refusal.BAD_TOKEN and store.device("d1").verify_key == b"v" * 32


def test_revoking_a_token_revokes_its_devices(store):
    store.add_token("tok")
    store.enrol("d1", b"v" * 32, b"b" * 32, "pi", "tok")
    store.revoke_token("tok")
    assert not store.token_valid("tok")
    assert store.device("d1").revoked


def test_key_value_round_trips_json(store):
    store.put("refusals", {"replayed": 3})
    assert store.get("refusals") == {"replayed": 3}
    assert store.get("missing", 7) == 7


def test_an_unwritable_state_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the state directory should be")
    with pytest.raises(StateUnavailable, match="cannot open state database"):
        open_store(str(blocker / "state.db"))
