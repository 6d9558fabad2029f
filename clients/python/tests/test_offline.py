"""Pure tests (no broker): request bodies, reply parsing, redaction, the JSON schemas."""

import json
import re

import pytest

from baton_client import (
    BatonConnectionError,
    Client,
    Description,
    EventsPage,
    ReleasedConnection,
    Request,
    deadline_after,
    format_timestamp,
    parse_reply,
    redact_url,
)
from baton_client.errors import RejectedError
from baton_client.types import events_of_message

from conftest import SCHEMA_DIR, VECTORS, load_schema_registry

TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def test_request_bodies_follow_section_3_2():
    r = Request.claim("b", "ann", "c1", 30000, request_id="r1")
    assert r.body() == {"v": 1, "op": "claim", "request_id": "r1", "buffer": "b", "user": "ann",
                        "connection": "c1", "lease_ms": 30000}
    assert list(r.body("2026-11-28T00:15:44.123Z"))[-1] == "deadline"
    # Optional fields are left out, never null.
    assert "lease_ms" not in Request.claim("b", "u", "c").body()
    assert Request.events().body().keys() == {"v", "op", "request_id"}
    assert Request.force_release("b").exchange == "baton.admin"
    assert Request.inspect("b").exchange == "baton.requests"
    with pytest.raises(ValueError):
        Request.claim("b", "u", "c", lease_ms=999)
    with pytest.raises(ValueError):
        Request.events(limit=257)
    with pytest.raises(TypeError):
        Request.renew("b", "c", token=True)
    # NFC: "e" + combining acute becomes "é".
    assert Request.inspect("e\u0301").buffer == "\u00e9"


def test_request_ids_are_uuid4():
    ids = {Request.inspect("b").request_id for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[0-9a-f-]{36}", i) and i[14] == "4" for i in ids)


def test_timestamps():
    from datetime import datetime, timezone

    assert format_timestamp(datetime(2026, 11, 28, 0, 15, 44, 123999, tzinfo=timezone.utc)) == \
        "2026-11-28T00:15:44.123Z"
    assert TS.match(deadline_after(5))


def test_redaction():
    assert redact_url("amqp://u:s3cret@h:5672/v") == "amqp://u:********@h:5672/v"
    assert "s3cret" not in redact_url("amqps://u:s3cret@h/v?password=s3cret")
    # A password with an unencoded '/', '?' or '#' (base64 passwords have '/') must not survive either.
    for secret in ("Xy7/Secret+Pw", "a?b", "c#d"):
        assert secret not in redact_url(f"amqp://svc:{secret}@broker:5672/prod")
    with pytest.raises(ValueError) as failure:
        Client("amqp://svc:Xy7/Secret+Pw@broker:5672/prod", partitions=4)
    assert "Secret" not in str(failure.value)
    assert redact_url("amqp://h/v") == "amqp://h/v"


def test_connection_error_hides_password():
    url = "amqp://someone:Pa55-w0rd-XYZ@127.0.0.1:1/nowhere"
    with pytest.raises(BatonConnectionError) as ei:
        Client(url, partitions=4, timeout=1.0)
    assert "Pa55-w0rd-XYZ" not in str(ei.value)
    assert "someone:********@127.0.0.1:1" in str(ei.value)


def test_parse_reply_statuses():
    base = {"v": 1, "request_id": "r", "buffer": None, "holder": None, "token": None,
            "expires_at": None, "at": None, "partition": 0}
    rc = parse_reply(dict(base, status="released_connection", buffers=["a"], released_count=3,
                          at="2026-11-28T00:15:44.123Z"))
    assert isinstance(rc, ReleasedConnection) and rc.buffers == ("a",) and not rc.complete
    d = parse_reply(dict(base, status="description", protocol=1, revision=3, partitions=16,
                         ops=["claim"], future_field=1))
    assert isinstance(d, Description) and d.partitions == 16
    e = parse_reply(dict(base, status="events", events=[{"kind": "granted", "buffer": "b",
                                                         "holder": {"user": "u", "connection": "c"},
                                                         "token": 1, "seq": 5, "partition": 0,
                                                         "at": "x", "new": True}],
                         position=5, more=False, missed=False))
    assert isinstance(e, EventsPage) and e.events[0].seq == 5
    # Unknown status -> error / internal_error (compatibility rules).
    u = parse_reply(dict(base, status="teleported"))
    assert u.status == "error" and u.error.code == "internal_error"
    with pytest.raises(RejectedError) as ei:
        parse_reply(dict(base, status="error", error={"code": "brand_new", "message": "m"})) \
            .raise_for_error()
    assert ei.value.code == "brand_new" and ei.value.effective_code == "internal_error"


def test_events_of_message_both_forms():
    ev = {"v": 1, "kind": "granted", "buffer": "b", "holder": {"user": "u", "connection": "c"},
          "token": 1, "at": "2026-11-28T00:15:14.123Z", "partition": 6, "seq": 1}
    assert events_of_message({"v": 1, "partition": 6, "events": [ev, ev]}) == [ev, ev]
    assert events_of_message(ev) == [ev]
    assert events_of_message([1]) == []


# ---------------------------------------------------------------- schemas

def _validator(name):
    pytest.importorskip("jsonschema")
    validator, _ = load_schema_registry()
    return validator(name)


def test_schemas_are_valid_2020_12():
    pytest.importorskip("jsonschema")
    from jsonschema import Draft202012Validator

    names = sorted(p.name for p in SCHEMA_DIR.glob("*.json"))
    assert names == ["batch-reply.schema.json", "batch-request.schema.json",
                     "event.schema.json", "events-message.schema.json",
                     "reply.schema.json", "request.schema.json"]
    for n in names:
        Draft202012Validator.check_schema(json.loads((SCHEMA_DIR / n).read_text()))


DOC_REPLIES = [
    '{"v":1,"request_id":"3f6c1a2e-0001","status":"granted","buffer":"project:42/src/main.rs","holder":{"user":"ann","connection":"conn-a1"},"token":7,"expires_at":"2026-11-28T00:15:44.123Z","at":"2026-11-28T00:15:14.123Z","partition":6}',
    '{"v":1,"request_id":"9b2d77f0-0001","status":"denied","buffer":"project:42/src/main.rs","holder":{"user":"ann","connection":"conn-a1"},"token":7,"expires_at":"2026-11-28T00:15:44.123Z","at":"2026-11-28T00:15:20.456Z","partition":6}',
    '{"v":1,"request_id":"3f6c1a2e-0002","status":"released","buffer":"project:42/src/main.rs","holder":null,"token":7,"expires_at":null,"at":"2026-11-28T00:15:30.000Z","partition":6}',
    '{"v":1,"request_id":"9b2d77f0-0002","status":"state","buffer":"project:42/src/main.rs","holder":null,"token":7,"expires_at":null,"at":"2026-11-28T00:15:31.250Z","partition":6}',
    '{"v":1,"request_id":"5d0e4b11-0001","status":"released_connection","buffer":null,"holder":null,"token":null,"expires_at":null,"at":"2026-11-28T00:15:40.002Z","partition":12,"buffers":["project:42/README.md"],"released_count":1}',
    '{"v":1,"request_id":"3f6c1a2e-0003","status":"error","buffer":"project:42/src/main.rs","holder":null,"token":null,"expires_at":null,"at":null,"partition":6,"error":{"code":"invalid_request","message":"field \'lease_ms\' must be an integer from 1000 to 3600000 (omit it for 30000), got 500"}}',
    '{"v":1,"request_id":"c0ffee-01","status":"description","buffer":null,"holder":null,"token":null,"expires_at":null,"at":null,"partition":0,"protocol":1,"revision":3,"partitions":16,"ops":["claim","renew","release","inspect","release_connection","force_release","describe","events"]}',
]


@pytest.mark.parametrize("text", DOC_REPLIES, ids=lambda t: json.loads(t)["status"])
def test_documented_replies_match_reply_schema(text):
    _validator("reply.schema.json").validate(json.loads(text))


def test_reply_schema_rejects_status_only_fields_elsewhere():
    v = _validator("reply.schema.json")
    ok = json.loads(DOC_REPLIES[3])
    assert v.is_valid(dict(ok, unknown_future_field=1))
    assert not v.is_valid(dict(ok, buffers=[]))
    assert not v.is_valid(dict(ok, error={"code": "x", "message": "y"}))
    bad = dict(ok)
    del bad["holder"]
    assert not v.is_valid(bad)
    assert not v.is_valid(dict(ok, at="2026-11-28T00:15:31Z"))
    rc = json.loads(DOC_REPLIES[4])
    del rc["released_count"]
    assert not v.is_valid(rc)


def test_request_schema_strict_per_op():
    v = _validator("request.schema.json")
    assert v.is_valid({"v": 1, "op": "claim", "request_id": "r", "buffer": "b", "user": "u",
                       "connection": "c", "lease_ms": 1000, "deadline": "2026-11-28T00:15:44.123Z"})
    assert not v.is_valid({"v": 1, "op": "claim", "request_id": "r", "buffer": "b", "user": "u",
                           "connection": "c", "token": 1})
    assert not v.is_valid({"v": 1, "op": "claim", "request_id": "r", "buffer": "b", "user": "u",
                           "connection": "c", "lease_ms": None})
    assert not v.is_valid({"v": 1, "op": "grab", "request_id": "r"})
    assert v.is_valid({"v": 1, "op": "events", "request_id": "r"})
    assert v.is_valid({"v": 1, "op": "describe", "request_id": "r"})
    assert v.is_valid({"v": 1, "op": "force_release", "request_id": "r", "buffer": "b",
                       "reason": "stuck"})
    assert not v.is_valid({"v": 1, "op": "inspect", "request_id": "r", "buffer": "a\u0000"})
    b = _validator("batch-request.schema.json")
    assert b.is_valid({"v": 1, "batch": [{"v": 1, "op": "describe", "request_id": "r"}]})
    assert not b.is_valid({"v": 1, "batch": []})
    assert not b.is_valid({"v": 1, "batch": [{"v": 1, "op": "describe", "request_id": "r"}],
                           "x": 1})


def test_event_schemas():
    ev = {"v": 1, "kind": "granted", "buffer": "project:42/src/main.rs",
          "holder": {"user": "ann", "connection": "conn-a1"}, "token": 7,
          "at": "2026-11-28T00:15:14.123Z", "partition": 6, "seq": 1843}
    _validator("event.schema.json").validate(ev)
    _validator("event.schema.json").validate(dict(ev, kind="released", forced=True))
    assert not _validator("event.schema.json").is_valid(dict(ev, forced=False))
    _validator("events-message.schema.json").validate({"v": 1, "partition": 6, "events": [ev]})


def test_vectors_file_shape():
    doc = json.loads(VECTORS.read_text(encoding="utf-8"))
    # Revision 3 or later: the vectors grow with the protocol's additions (revision 4: wait_ms).
    assert doc["protocol"] == 1 and doc["revision"] >= 3
    assert 30 <= len(doc["cases"]) <= 80
    names = [c["name"] for c in doc["cases"]]
    assert len(set(names)) == len(names)
    for c in doc["cases"]:
        later = set()
        for s in c["steps"]:
            if "answer" in s:
                # The answer to an earlier `later` step of the case (a claim that waited in line).
                assert set(s) <= {"answer", "expect"} and s["answer"] in later
                continue
            assert ("send" in s) != ("send_raw" in s)
            assert set(s) <= {"send", "send_raw", "route", "user_id", "expect", "later", "repeat"}
            if "repeat" in s:
                # N steps in one, {n} their index; a repeated step is answered at once.
                assert isinstance(s["repeat"], int) and 1 <= s["repeat"] <= 1024 and "later" not in s
            assert ("later" in s) != ("expect" in s)
            if "later" in s:
                later.add(s["later"])
            assert "force_release" not in json.dumps(s)


def test_broker_urls_of_different_users_are_refused():
    """Several URLs name one broker's nodes for one principal (the user is sent as user_id)."""
    with pytest.raises(ValueError, match="different users"):
        Client("amqp://ann:x@127.0.0.1:1/%2F,amqp://bob:y@127.0.0.1:2/%2F", partitions=4, timeout=1.0)
