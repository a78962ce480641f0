"""The library's layering, checked: ``import realtime`` pulls in no web
framework and no Redis client, the core needs no event loop, and no module
of ``src/`` imports one that imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


THIRD_PARTY = {
    "aiohttp", "redis", "hiredis", "yarl", "multidict", "uvloop", "starlette", "prometheus_client",
}  # fmt: skip


def imported_after(code: str) -> set[str]:
    """The modules in ``sys.modules`` after running ``code`` in a fresh
    interpreter, less those the bare interpreter has, and their packages."""
    probe = (
        "import sys; before = set(sys.modules)\n"
        f"{code}\n"
        "new = set(sys.modules) - before\n"
        "print(' '.join(sorted(new | {m.split('.')[0] for m in new})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return set(out.stdout.split())


def test_import_realtime_imports_no_framework_and_no_redis_client() -> None:
    loaded = imported_after("import realtime")
    assert {m for m in loaded if m.startswith("realtime")} == {"realtime"}  # nothing yet
    assert not loaded & THIRD_PARTY
    # The node, sessions and the local-only backend need neither.
    loaded = imported_after("import realtime as r; r.Node; r.Session; r.MemoryBackend")
    assert "realtime.node" in loaded
    assert not loaded & THIRD_PARTY


def test_the_parts_that_need_them_load_them_when_used() -> None:
    assert "aiohttp" in imported_after("import realtime; realtime.AiohttpTransport")
    assert "redis" in imported_after(
        "import realtime; realtime.open_backend('redis://127.0.0.1:1/0', pod_id='p')"
    )
    assert not imported_after("import realtime; realtime.AsgiTransport") & {"aiohttp", "redis"}


def test_the_core_needs_no_event_loop() -> None:
    modules = ["access", "connection", "exceptions", "hub", "protocol", "ratelimit", "sequencer"]
    code = "; ".join(f"import realtime.core.{m}" for m in modules)
    assert "asyncio" not in imported_after(code)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            for alias in node.names:
                for candidate in (f"{base}.{alias.name}", base):
                    if candidate in modules and candidate != name:
                        found.add(candidate)
                        break
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules and a.name != name}
    return found


def test_no_module_imports_one_that_imports_it_back() -> None:
    paths = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        paths[".".join(parts)] = path
    graph = {name: _imports(path, name, set(paths)) for name, path in paths.items()}
    cycles = []

    def visit(name: str, stack: list[str], done: set[str]) -> None:
        if name in stack:
            cycles.append(" -> ".join([*stack[stack.index(name) :], name]))
            return
        if name in done:
            return
        done.add(name)
        for dep in sorted(graph[name]):
            visit(dep, [*stack, name], done)

    seen: set[str] = set()
    for name in sorted(graph):
        visit(name, [], seen)
    assert cycles == []
