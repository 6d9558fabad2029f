"""Runs the Python client's tests for `swift test` (Tests/IntegrationTests/PythonClientTests.swift).

The Swift harness starts this with a pipe as standard input and never writes to it: when the harness
dies, however it ends, the pipe reaches end of file and this process exits with everything it started,
so no test outlives its run. Arguments go to pytest.
"""

import os
import sys
import threading


def _lifeline() -> None:
    while True:
        try:
            chunk = os.read(0, 256)
        except InterruptedError:
            continue
        except OSError:
            break
        if not chunk:
            break
    os._exit(3)


if __name__ == "__main__":
    threading.Thread(target=_lifeline, name="baton-lifeline", daemon=True).start()
    import pytest

    sys.exit(pytest.main(sys.argv[1:]))
