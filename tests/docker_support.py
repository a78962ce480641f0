"""A real Docker engine for the image test: the CLI, a daemon, a base image.

``Docker`` runs the ``docker`` CLI with a deadline on every call.
``DockerDaemon`` finds a daemon that answers or, as root with ``dockerd``
installed, starts one of its own (host networking only: no bridge, no
iptables rules, no NAT) and stops it afterwards. ``debian_base_image`` makes
a base image from Debian's packages, since no image registry is reachable:
``debootstrap --variant=minbase bookworm`` piped into ``docker import``,
cached as an image tag and as a tarball under ``~/.cache/chat-api-test/``.
``build_image`` builds the repository's Dockerfile on it and remembers every
image layer that build created, so the test removes exactly those.

Nothing here sleeps for a fixed time: every wait is on a condition with a
deadline.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chat-api-test"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_TAG = "chat-api-test/debian-bookworm-minbase:1"
# What Docker itself uses when an image sets no PATH (`docker import` sets none).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Certificates added to this machine's trust store (Debian's place for them):
# a TLS-inspecting proxy between the build and PyPI needs them in the build.
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")

DAEMON_START_TIMEOUT = 60.0
DEBOOTSTRAP_TIMEOUT = 240.0
BUILD_TIMEOUT = 300.0


class DockerUnavailable(Exception):
    """No Docker engine can be had on this machine; the reason says why."""


class DockerError(RuntimeError):
    """A docker command failed; the message carries its output."""


@dataclass
class Docker:
    """The ``docker`` CLI."""

    exe: str

    def run(
        self, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        try:
            result = subprocess.run(
                [self.exe, *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise DockerError(f"docker {' '.join(args)}: no answer within {timeout}s") from exc
        if check and result.returncode != 0:
            raise DockerError(
                f"docker {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}{result.stderr[-4000:]}"
            )
        return result

    def answers(self, timeout: float = 20.0) -> bool:
        try:
            return self.run("info", "--format", "{{.ServerVersion}}", timeout=timeout).stdout != ""
        except DockerError:
            return False

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False).returncode == 0

    def inspect(self, ref: str, template: str) -> str:
        return self.run("inspect", "--format", template, ref).stdout.strip()


@dataclass
class DockerDaemon:
    """A daemon that answers: one already running, or one started here."""

    docker: Docker
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @classmethod
    def ensure(cls) -> DockerDaemon:
        exe = shutil.which("docker")
        if exe is None:
            raise DockerUnavailable("no docker CLI on PATH (apt-get install docker.io)")
        daemon = cls(Docker(exe))
        if daemon.docker.answers():
            return daemon
        if os.environ.get("DOCKER_HOST"):
            raise DockerUnavailable(f"DOCKER_HOST={os.environ['DOCKER_HOST']} does not answer")
        if os.geteuid() != 0:
            raise DockerUnavailable("no Docker daemon answers, and only root can start dockerd")
        dockerd = shutil.which("dockerd", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
        if dockerd is None:
            raise DockerUnavailable(
                "no Docker daemon answers and dockerd is not installed (apt-get install docker.io)"
            )
        daemon.start(dockerd)
        return daemon

    def start(self, dockerd: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="chat-api-dockerd-")
        self.log_path = Path(self._tmp.name) / "dockerd.log"
        with self.log_path.open("wb") as log:
            # Containers here use the host's network only, so the daemon
            # makes no bridge, no iptables rules and no NAT: nothing is
            # addressed but 127.0.0.1.
            self.proc = subprocess.Popen(
                [
                    dockerd,
                    "--bridge=none",
                    "--iptables=false",
                    "--ip-forward=false",
                    "--ip-masq=false",
                    "--pidfile",
                    str(Path(self._tmp.name) / "dockerd.pid"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise DockerUnavailable(f"dockerd cannot run on this machine:\n{tail}")
            if self.docker.answers(timeout=5):
                return
            time.sleep(0.2)  # polling interval while the daemon starts
        tail = self.log_tail()
        self.stop()
        raise DockerError(f"dockerd did not answer within {DAEMON_START_TIMEOUT}s:\n{tail}")

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the daemon if it was started here (by its PID); else nothing."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def debian_base_image(docker: Docker) -> str:
    """A Debian bookworm image without Python, made from Debian's packages.

    Kept between runs as the image tag and as a tarball in ``CACHE_DIR`` (so a
    wiped Docker data directory costs an import, not a debootstrap).
    """
    if docker.image_exists(BASE_TAG):
        return BASE_TAG
    tarball = CACHE_DIR / "debian-bookworm-minbase.tar"
    if not tarball.exists():
        _debootstrap(tarball)
    docker.run(
        "import",
        "--change",
        f"ENV PATH={DEFAULT_PATH}",
        "--change",
        'CMD ["/bin/bash"]',
        "--message",
        "debootstrap --variant=minbase bookworm (chat-api tests)",
        str(tarball),
        BASE_TAG,
        timeout=120,
    )
    return BASE_TAG


def _debootstrap(tarball: Path) -> None:
    exe = shutil.which("debootstrap", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if exe is None:
        raise DockerUnavailable("debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise DockerUnavailable("debootstrap needs root")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=CACHE_DIR) as tmp:
        root = Path(tmp) / "rootfs"
        try:
            subprocess.run(
                [exe, "--variant=minbase", "bookworm", str(root), DEBIAN_MIRROR],
                capture_output=True,
                text=True,
                timeout=DEBOOTSTRAP_TIMEOUT,
                check=True,
            )
        except subprocess.CalledProcessError as exc:
            output = f"{exc.stdout[-3000:]}{exc.stderr[-3000:]}"
            raise DockerError(f"debootstrap failed:\n{output}") from exc
        # As Debian's own images do: no downloaded packages, no package lists.
        for pattern in (
            "var/cache/apt/archives/*.deb",
            "var/cache/apt/*.bin",
            "var/lib/apt/lists/*",
        ):
            for path in root.glob(pattern):
                if path.is_file():
                    path.unlink()
        partial = tarball.with_suffix(".tar.partial")
        subprocess.run(
            ["tar", "-C", str(root), "-cf", str(partial), "."],
            capture_output=True,
            timeout=120,
            check=True,
        )
        partial.rename(tarball)


def local_ca_certificates() -> str:
    """The PEM certificates added to this machine's trust store, if any."""
    if not LOCAL_CA_DIR.is_dir():
        return ""
    return "".join(p.read_text() for p in sorted(LOCAL_CA_DIR.rglob("*.crt")))


@dataclass
class BuiltImage:
    tag: str
    created: list[str]  # every image id the build made (not cache hits)
    log: str


_STEP = re.compile(r"^Step \d+/\d+ : (\S+)", re.MULTILINE)
_IMAGE_ID = re.compile(r"^ ---> ([0-9a-f]{12})$", re.MULTILINE)


def build_image(
    docker: Docker, tag: str, base: str, *, build_args: Sequence[str] = ()
) -> BuiltImage:
    """``docker build`` of the repository on ``base``, pip reaching PyPI via the host."""
    args = ["build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}", "-t", tag]
    certs = local_ca_certificates()
    if certs:
        args += ["--build-arg", f"BUILD_CA_CERTS={certs}"]
    for arg in build_args:
        args += ["--build-arg", arg]
    result = docker.run(*args, str(REPO), timeout=BUILD_TIMEOUT, check=False)
    log = result.stdout + result.stderr
    created = _created_layers(log)
    if result.returncode != 0:
        remove_images(docker, created)
        raise DockerError(f"docker build exited {result.returncode}:\n{log[-6000:]}")
    return BuiltImage(tag, created, log)


def _created_layers(log: str) -> list[str]:
    """Image ids that the legacy builder committed in this build.

    A step's block ends with `` ---> <id>``; a ``FROM`` step names an image
    that already existed, and a ``Using cache`` step reuses one.
    """
    created = []
    steps = list(_STEP.finditer(log))
    for i, step in enumerate(steps):
        end = steps[i + 1].start() if i + 1 < len(steps) else len(log)
        block = log[step.start() : end]
        if step.group(1).upper() == "FROM" or "Using cache" in block:
            continue
        ids = _IMAGE_ID.findall(block)
        if ids:
            created.append(ids[-1])
    return created


def remove_images(docker: Docker, refs: Sequence[str]) -> None:
    """Remove images, newest first; ones already gone are fine."""
    for ref in reversed(refs):
        docker.run("rmi", ref, check=False, timeout=60)
