"""Shared fixtures. The live tests need a running worker on a scratch virtual host:

    BATON_TEST_AMQP_URL            a frontend user's URL (amqp://user:pass@host:port/vhost)
    BATON_TEST_OPERATOR_AMQP_URL   an operator's URL on the same vhost (may publish to baton.admin)
    BATON_TEST_PARTITIONS          the deployment's N

Without them the live tests are skipped, or fail when the environment variable CI is set.
Run from the repository root:

    python -m pytest -q -c clients/python/pyproject.toml clients/python/tests
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PACKAGE_ROOT = HERE.parent  # clients/python
REPO_ROOT = PACKAGE_ROOT.parent.parent
SCHEMA_DIR = REPO_ROOT / "docs" / "schema"
VECTORS = REPO_ROOT / "docs" / "conformance" / "vectors.json"

# Import the package from the source tree whatever pytest's rootdir and ini options are.
if str(PACKAGE_ROOT) not in sys.path:
    sys.path.insert(0, str(PACKAGE_ROOT))

ENV_URL = "BATON_TEST_AMQP_URL"
ENV_OPERATOR_URL = "BATON_TEST_OPERATOR_AMQP_URL"
ENV_PARTITIONS = "BATON_TEST_PARTITIONS"


def live_config():
    url = os.environ.get(ENV_URL)
    op = os.environ.get(ENV_OPERATOR_URL)
    n = os.environ.get(ENV_PARTITIONS)
    missing = [k for k, v in ((ENV_URL, url), (ENV_OPERATOR_URL, op), (ENV_PARTITIONS, n)) if not v]
    return url, op, n, missing


@pytest.fixture(scope="session")
def live():
    url, op, n, missing = live_config()
    if missing:
        msg = f"live Baton worker not configured: {', '.join(missing)} not set"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set, so this is a failure)")
        pytest.skip(msg)
    try:
        n_int = int(n)
    except ValueError:
        pytest.fail(f"{ENV_PARTITIONS}={n!r} is not an integer")
    return {"url": url, "operator_url": op, "partitions": n_int}


@pytest.fixture(scope="session")
def client(live):
    from baton_client import Client

    c = Client(live["url"], partitions=live["partitions"], timeout=10.0)
    yield c
    c.close()


@pytest.fixture(scope="session")
def operator(live):
    from baton_client import Client

    c = Client(live["operator_url"], partitions=live["partitions"], timeout=10.0)
    yield c
    c.close()


@pytest.fixture
def buf(request):
    """A buffer name unique to this test run and test."""
    return f"pytest/{uuid.uuid4().hex[:12]}/{request.node.name}"


@pytest.fixture
def conn():
    return f"conn-{uuid.uuid4()}"


def load_schema_registry():
    """(validator_for(name), registry) over docs/schema/*.json, resolved by $id."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    resources = []
    schemas = {}
    for p in sorted(SCHEMA_DIR.glob("*.json")):
        doc = json.loads(p.read_text(encoding="utf-8"))
        schemas[p.name] = doc
        resources.append((doc["$id"], Resource.from_contents(doc)))
    registry = Registry().with_resources(resources)

    def validator(name):
        return Draft202012Validator(schemas[name], registry=registry,
                                    format_checker=Draft202012Validator.FORMAT_CHECKER)

    return validator, schemas


@pytest.fixture(scope="session")
def schema_validator():
    pytest.importorskip("jsonschema")
    validator, _ = load_schema_registry()
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = validator(name)
        return cache[name]

    return get
