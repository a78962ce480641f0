#!/usr/bin/env python3
"""Write every setting of ``chat_api.config.Config`` into ``.env.example``
and the README's configuration table, from the fields' own help texts and
defaults (``tests/test_config.py`` checks that they agree).

    .venv/bin/python scripts/settings_docs.py

``.env.example`` keeps its layout: each setting's comment and value are
rewritten in place, and a new setting goes after the one declared before it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from chat_api.config import Config  # noqa: E402


def shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def env_example() -> None:
    path = ROOT / ".env.example"
    lines = path.read_text().splitlines()
    where: dict[str, int] = {}
    for i, line in enumerate(lines):
        match = re.match(r"([A-Z][A-Z0-9_]*)=", line)
        if match:
            where[match.group(1)] = i
    previous: str | None = None
    for f in Config.settings():
        name, text = f.metadata["env"], f.metadata["help"]
        entry = [f"# {text}", f"{name}={shown(f.default)}"]
        if name in where:
            i = where[name]
            lines[i - 1 : i + 1] = entry
        else:
            at = where[previous] + 1 if previous is not None else len(lines)
            lines[at:at] = entry
            where = {n: (j + 2 if j >= at else j) for n, j in where.items()}
            where[name] = at + 1
        previous = name
    path.write_text("\n".join(lines) + "\n")


def readme() -> None:
    path = ROOT / "README.md"
    text = path.read_text()
    head = "| variable | default | what |\n|---|---|---|\n"
    start = text.index(head) + len(head)
    end = text.index("\n\n", start)
    rows = [
        f"| `{f.metadata['env']}` | `{shown(f.default)}` | {f.metadata['help']} |"
        for f in Config.settings()
    ]
    path.write_text(text[:start] + "\n".join(rows) + text[end:])


if __name__ == "__main__":
    env_example()
    readme()
