"""``scripts/ensure-chromium``: 0 only when the browser is there (found or
installed), non-zero with a reason when it cannot install or find it.

Runs the real script with a PATH of stand-ins for ``id`` and ``apt-get``, so
nothing is installed and no root is needed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ensure-chromium"


UPDATE_ONLY = 'case " $* " in *" update "*) exit 0;; esac; exit 100'


def stand_in(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def run(tmp_path: Path, *, uid: int, apt: str | None) -> subprocess.CompletedProcess[str]:
    """The script with a fake ``id -u`` and, unless None, a fake ``apt-get``
    whose body is ``apt``; CHROMIUM points into ``tmp_path``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in(bin_dir, "id", f"echo {uid}")
    if apt is not None:
        stand_in(bin_dir, "apt-get", apt)
    return subprocess.run(
        ["/bin/sh", str(SCRIPT)],
        env={"PATH": str(bin_dir), "CHROMIUM": str(tmp_path / "chromium")},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_browser_that_is_there_is_enough(tmp_path: Path) -> None:
    stand_in(tmp_path, "chromium", "exit 0")
    result = run(tmp_path, uid=1000, apt=None)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize(
    ("uid", "apt", "says"),
    [
        (1000, None, "this user cannot install it (needs root and apt-get)"),
        (1000, "exit 0", "this user cannot install it (needs root and apt-get)"),
        (0, None, "this user cannot install it (needs root and apt-get)"),
        (0, "exit 100", "installing chromium failed"),
        (0, UPDATE_ONLY, "installing chromium failed"),  # update works, install fails
        (0, "exit 0", "is installed but"),  # apt says yes, yet no browser where expected
    ],
)
def test_no_browser_is_an_error_with_a_reason(
    tmp_path: Path, uid: int, apt: str | None, says: str
) -> None:
    result = run(tmp_path, uid=uid, apt=apt)
    assert result.returncode == 1, result
    assert says in result.stderr
    assert "CHAT_API_REQUIRE_BROWSER=1" in result.stderr


def test_installs_when_root_with_apt_get(tmp_path: Path) -> None:
    browser = tmp_path / "chromium"
    install = f'echo "#!/bin/sh" > {browser}; /bin/chmod +x {browser}'
    apt = f'case " $* " in *" install "*) {install};; esac'
    result = run(tmp_path, uid=0, apt=apt)
    assert result.returncode == 0, result
    assert "installing the chromium package" in result.stderr
    assert browser.exists()
