"""The collab-server example (examples/python/collab_server.py) against the live worker."""

import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.live


def test_the_collab_server_example_refuses_a_stale_write(live):
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "python" / "collab_server.py"), live["url"], str(live["partitions"])],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "refused (token 1 is older than 2" in done.stdout, done.stdout
    assert "the buffer holds: \"bob's edit\"" in done.stdout or "the buffer holds: 'bob's edit'" in done.stdout, done.stdout
