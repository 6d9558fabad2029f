"""The call schedule (``baton_client._schedule``): the cases of docs/conformance/call-schedule.json,
which the Swift tests replay too (``CallScheduleTests``), and its bounds under random jitter. Pure: no
broker, no clock."""

import json
import random
from typing import Any, Dict, List, Optional

import pytest

from baton_client._schedule import SEND, TIMED_OUT, CallSchedule, Step
from conftest import REPO_ROOT

CASES: List[Dict[str, Any]] = json.loads(
    (REPO_ROOT / "docs" / "conformance" / "call-schedule.json").read_text())["cases"]


def expected(value: Any) -> Step:
    if value in (SEND, TIMED_OUT):
        return str(value)
    (key, until), = value.items()
    assert key in ("wait_until", "wait_for_channel_until"), key
    return (key, until)


def test_the_file_has_cases() -> None:
    assert len(CASES) >= 8


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_replays(case: Dict[str, Any]) -> None:
    schedule = CallSchedule(case["resend_after"], case["deadline"], case.get("waiting", False),
                            case.get("max_interval"))
    for index, step in enumerate(case["steps"]):
        channel: Optional[int] = step["channel"]
        got = schedule.step(step["at"], channel, step.get("blocked", False))
        assert got == expected(step["expect"]), f"step {index} at {step['at']}"
        if got == SEND:
            assert channel is not None
            schedule.sent(step["at"], channel, step.get("jitter", 1.0))
    assert schedule.attempts == case["end"]["attempts"]
    assert schedule.last_blocked == case["end"]["last_blocked"]


def test_resends_stay_within_their_bounds_for_any_jitter() -> None:
    rng = random.Random(7)
    for _ in range(200):
        resend_after = rng.randrange(100, 3100)
        deadline = rng.randrange(1, 60_001)
        schedule = CallSchedule(resend_after, deadline, rng.random() < 0.5)
        now, last = 0, None
        while True:
            step = schedule.step(now, 1)
            if step == TIMED_OUT:
                assert now >= deadline
                break
            if step == SEND:
                if last is not None:
                    assert now - last >= int(resend_after * 0.8) - 1 or now == deadline
                last = now
                schedule.sent(now, 1, rng.uniform(0.8, 1.2))
                continue
            assert isinstance(step, tuple) and step[0] == "wait_until"
            assert now < step[1] <= deadline
            cap = schedule.cap
            assert cap is not None and step[1] - (last or 0) <= int(cap * 1.2) + 1
            now = step[1]
