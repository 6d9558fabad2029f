"""The package builds into a wheel that installs into a fresh virtual environment with its one
dependency and exposes the typed API (py.typed included)."""

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from conftest import PACKAGE_ROOT


def test_a_wheel_installs_into_a_fresh_virtual_environment(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(PACKAGE_ROOT)], check=True, timeout=300)
    (wheel,) = wheels.glob("baton_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "baton_client/py.typed" in names
    assert "Requires-Dist: pika>=1.3" in metadata
    assert "Apache" in metadata
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    # pika from the same index the tests' environment used (no network beyond it).
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
                   check=True, timeout=300)
    out = subprocess.run([str(python), "-c", "import baton_client, inspect; "
                          "print(baton_client.Client.__module__, 'stale_after' in inspect.signature(baton_client.Client).parameters)"],
                         check=True, capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert out.stdout.split() == ["baton_client.client", "True"]


def test_the_package_has_no_import_cycle():
    """Every import between the package's modules, wherever it is written (top level, inside a
    function, under TYPE_CHECKING), forms an acyclic graph; the kept lease and the watch depend on the
    client's protocol (``_calls``), not on ``client``."""
    import ast

    package = Path(__file__).resolve().parent.parent / "baton_client"
    graph = {}
    for path in sorted(package.glob("*.py")):
        name = path.stem
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    edges.add(node.module.split(".")[0])
                else:
                    edges.update(alias.name for alias in node.names)
        graph[name] = edges - {name}
    assert "client" not in graph["lease"] and "client" not in graph["watch"]
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join(trail + [module])}"
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            visit(target, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
