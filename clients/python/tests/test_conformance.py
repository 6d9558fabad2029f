"""Replays every case of docs/conformance/vectors.json against the live worker (format:
docs/conformance/README.md) and checks each reply against docs/schema."""

from __future__ import annotations

import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from baton_client import partition as partition_of

from conftest import VECTORS

pytestmark = pytest.mark.live

RUN = uuid.uuid4().hex[:10]
DOC = json.loads(VECTORS.read_text(encoding="utf-8"))
CASES = DOC["cases"]
PLACEHOLDER = re.compile(r"\{(buffer|conn|id)(?::([^{}\"]+))?\}")
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


class Names:
    def __init__(self, case_index: int):
        self.case = case_index

    def __call__(self, m: re.Match) -> str:
        kind, name = m.group(1), m.group(2)
        if kind == "buffer":
            return f"conformance/{RUN}/{self.case}/{name or 'main'}"
        if kind == "conn":
            return f"conn-{RUN}-{self.case}-{name or 'main'}"
        if name is None:
            return str(uuid.uuid4())  # {id}: fresh at every occurrence
        return f"{RUN}-{self.case}-{name}"


def substitute(value, names):
    if isinstance(value, str):
        return PLACEHOLDER.sub(names, value)
    if isinstance(value, list):
        return [substitute(v, names) for v in value]
    if isinstance(value, dict):
        return {substitute(k, names): substitute(v, names) for k, v in value.items()}
    return value


def with_index(value, index):
    """``value`` with ``{n}`` replaced by ``index`` in every string (a step's ``repeat``)."""
    if isinstance(value, str):
        return value.replace("{n}", str(index))
    if isinstance(value, list):
        return [with_index(v, index) for v in value]
    if isinstance(value, dict):
        return {with_index(k, index): with_index(v, index) for k, v in value.items()}
    return value


def expanded(steps):
    """The steps with each ``repeat: N`` step as N steps, ``{n}`` the 0-based repetition."""
    out = []
    for step in steps:
        times = step.get("repeat")
        if times is None:
            out.append(step)
            continue
        body = {k: v for k, v in step.items() if k != "repeat"}
        out.extend(with_index(body, i) for i in range(times))
    return out


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def match(expect, actual, path, ctx, errors):
    if isinstance(expect, str) and expect.startswith("@"):
        ok = {
            "@timestamp": lambda a: isinstance(a, str) and bool(TIMESTAMP.match(a)),
            "@integer": is_int,
            "@string": lambda a: isinstance(a, str),
            "@any": lambda a: True,
            "@partition": lambda a: is_int(a) and a == ctx["partition"],
            "@partitions": lambda a: is_int(a) and a == ctx["partitions"],
        }.get(expect)
        if ok is None:
            if actual != expect:
                errors.append(f"{path}: expected {expect!r}, got {actual!r}")
        elif not ok(actual):
            errors.append(f"{path}: expected {expect}, got {actual!r}")
        return
    if isinstance(expect, dict):
        if not isinstance(actual, dict):
            errors.append(f"{path}: expected an object, got {actual!r}")
            return
        for k, v in expect.items():
            if v == "@absent":
                if k in actual:
                    errors.append(f"{path}.{k}: expected absent, got {actual[k]!r}")
                continue
            if k not in actual:
                errors.append(f"{path}.{k}: missing")
                continue
            match(v, actual[k], f"{path}.{k}", ctx, errors)
        return
    if isinstance(expect, list):
        if not isinstance(actual, list) or len(actual) != len(expect):
            errors.append(f"{path}: expected {len(expect)} items, got {actual!r}")
            return
        for i, (e, a) in enumerate(zip(expect, actual)):
            match(e, a, f"{path}[{i}]", ctx, errors)
        return
    if isinstance(expect, bool) or isinstance(actual, bool) or expect is None or actual is None:
        if type(expect) is not type(actual) or expect != actual:
            errors.append(f"{path}: expected {expect!r}, got {actual!r}")
        return
    if expect != actual or type(expect) is not type(actual):
        errors.append(f"{path}: expected {expect!r}, got {actual!r}")


def route_of(step, send, n):
    if "route" in step:
        return int(step["route"])
    if isinstance(send, dict):
        if isinstance(send.get("buffer"), str):
            return partition_of(send["buffer"], n)
        if isinstance(send.get("batch"), list):
            for el in send["batch"]:
                if isinstance(el, dict) and isinstance(el.get("buffer"), str):
                    return partition_of(el["buffer"], n)
    return 0


def test_vectors_cover_enough():
    assert 30 <= len(CASES) <= 80


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c["name"] for c in CASES])
def test_case(index, client, schema_validator):
    case = CASES[index]
    names = Names(index)
    n = client.partitions
    if n == 1 and "misrouted" in json.dumps(case):
        pytest.skip("with N = 1 no request can be misrouted")
    # `later` steps: published now, answered later (a claim that waits in line); `answer` steps
    # check that answer (docs/conformance/README.md).
    pending = {}
    pool = ThreadPoolExecutor(max_workers=4)
    try:
        for i, step in enumerate(expanded(case["steps"])):
            _run_step(client, schema_validator, case, names, n, i, step, pool, pending)
    finally:
        # A `later` step whose answer moved to a repeat never gets one: its call times out on its own.
        pool.shutdown(wait=False)


def _check(case, i, route, n, expect, reply, batch, schema_validator):
    errors = []
    match(expect, reply, "reply", {"partition": route, "partitions": n}, errors)
    schema = "batch-reply.schema.json" if batch else "reply.schema.json"
    for e in schema_validator(schema).iter_errors(reply):
        errors.append(f"{schema}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
    assert not errors, (f"step {i} of {case['name']!r} (routed to {route}):\n  "
                        + "\n  ".join(errors) + f"\nreply: {json.dumps(reply)}")


def _run_step(client, schema_validator, case, names, n, i, step, pool, pending):
    if "answer" in step:
        future, route, batch = pending[step["answer"]]
        reply = future.result(timeout=10.0)
        _check(case, i, route, n, substitute(step["expect"], names), reply, batch, schema_validator)
        return
    if "send_raw" in step:
        raw = substitute(step["send_raw"], names)
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        route = route_of(step, parsed, n)
        body = raw.encode("utf-8")
        batch = isinstance(parsed, dict) and "batch" in parsed
    else:
        send = substitute(step["send"], names)
        route = route_of(step, send, n)
        body = json.dumps(send, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        batch = isinstance(send, dict) and "batch" in send
    with_user_id = step.get("user_id", True) is not False
    if "later" in step:
        # Published once (no resend: a resend would move the answer back to it), answered later.
        future = pool.submit(client.send_raw, body, route, with_user_id=with_user_id, timeout=12.0)
        time.sleep(0.3)
        assert not future.done(), (f"step {i} of {case['name']!r}: answered at once, it should "
                                   f"wait in line: {future.result()!r}")
        pending[step["later"]] = (future, route, batch)
        return
    expect = substitute(step["expect"], names)
    reply = client.send_raw(body, route, with_user_id=with_user_id, timeout=10.0)
    _check(case, i, route, n, expect, reply, batch, schema_validator)
