"""A collab server's ownership, reduced to its core, with the Python client.

Two servers edit one shared buffer. Each writes through ``FencedStore``, the resource side of
fencing: it remembers the highest token it has seen per buffer and refuses a write that carries a
lower one. Server A claims the buffer with a short lease and then stalls (a long GC pause, a stopped
VM) without renewing; its lease runs out, server B's waiting claim is granted with a higher token and
B writes; when A wakes up and writes with its old token, the store refuses it. Without the check, A's
stale write would overwrite B's: the incident Baton exists for.

    python examples/python/collab_server.py AMQP_URL [PARTITIONS]

Exits 0 when A's stale write was refused and B's stands; prints each step.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))

from baton_client import Client  # noqa: E402


class StaleToken(Exception):
    """A write whose fencing token is lower than one the store has already seen for the buffer."""


class FencedStore:
    """Where the collaborators' edits land (a database row, a CRDT document's storage, a file)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._highest: Dict[str, int] = {}
        self.contents: Dict[str, str] = {}

    def write(self, buffer: str, token: int, text: str) -> None:
        with self._lock:
            seen = self._highest.get(buffer, 0)
            if token < seen:
                raise StaleToken(f"token {token} is older than {seen}: this writer no longer owns {buffer!r}")
            self._highest[buffer] = token
            self.contents[buffer] = text


def main(url: str, partitions: Optional[int] = None) -> int:
    store = FencedStore()
    buffer = f"examples/{uuid.uuid4().hex[:8]}/main.rs"
    with Client(url, partitions=partitions, timeout=10.0) as a, Client(url, partitions=partitions, timeout=10.0) as b:
        first = a.claim(buffer, "ann", "server-a", lease_ms=1500)
        assert first.granted and first.token is not None
        store.write(buffer, first.token, "ann's first edit")
        print(f"A holds {buffer} with token {first.token} and writes")

        # B wants the buffer too and waits in its line instead of polling.
        result: Dict[str, object] = {}
        waiter = threading.Thread(target=lambda: result.setdefault(
            "b", b.claim(buffer, "bob", "server-b", lease_ms=30000, wait_ms=10000)))
        waiter.start()

        print("A stalls and does not renew ...")
        time.sleep(2.5)  # past A's 1.5 s lease: the worker hands the buffer to B's waiting claim
        waiter.join(15)
        second = result.get("b")
        assert second is not None and getattr(second, "granted", False), f"B was not granted: {second!r}"
        token_b = getattr(second, "token")
        store.write(buffer, token_b, "bob's edit")
        print(f"B was granted {buffer} with token {token_b} and writes")

        try:
            store.write(buffer, first.token, "ann's stale edit")
        except StaleToken as refused:
            print(f"A wakes up and writes with token {first.token}: refused ({refused})")
        else:
            print("A's stale write was accepted: the store does not check tokens")
            return 1
        assert store.contents[buffer] == "bob's edit"
        print(f"the buffer holds: {store.contents[buffer]!r}")
        b.release(buffer, "server-b", token_b)
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(64)
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None))
