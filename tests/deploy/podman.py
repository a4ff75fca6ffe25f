"""Podman for the container test: a private storage, a local Debian base image, the host's pip settings.

Owns: running podman against a storage of its own (a temporary directory
under /var/tmp, removed afterwards, so no image or container of this test
outlives it and the host's own podman storage is never touched), the
repository's containers.conf (runc, lower ulimits), the cached Debian
bookworm root filesystem the base image is imported from, and reading the
host's apt mirror and pip settings.

Never: names a registry or mirror host (they are read from this machine's
apt and pip configuration) or pulls from a container registry.

The one thing kept between runs is ROOTFS_CACHE, a tarball of a
debootstrapped Debian bookworm with python3 and python3-venv (about 270 MB,
45 s to rebuild); delete it to force a fresh one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.deploy.support import REPO, VENV_BIN

CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv")
CACHE_DIR = Path("/var/tmp/zen-server-test-cache")
ROOTFS_CACHE = CACHE_DIR / f"debian-{SUITE}-{'-'.join(PACKAGES)}.tar"


class PodmanUnavailableError(Exception):
    """Podman cannot run here at all (the reason is the message)."""


class Podman:
    """podman with a private root, runroot and tmpdir, and the repository's containers.conf."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}

    def argv(self, *args: str) -> list[str]:
        h = self.home
        return ["podman", "--root", f"{h}/s", "--runroot", f"{h}/r", "--tmpdir", f"{h}/t", *args]

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.argv(*args), env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def destroy(self) -> None:
        """Remove every container and image of this private storage, then the storage itself."""
        self.run("rm", "--all", "--force", "--time", "0", timeout=120, check=False)
        self.run("rmi", "--all", "--force", timeout=120, check=False)
        self.run("system", "reset", "--force", timeout=120, check=False)
        shutil.rmtree(self.home, ignore_errors=True)


@contextlib.contextmanager
def open_podman() -> Iterator[Podman]:
    """A Podman on fresh private storage; raises PodmanUnavailableError when podman cannot run."""
    if shutil.which("podman") is None:
        raise PodmanUnavailableError("podman is not installed (Debian package 'podman', in .ci/apt-packages.txt)")
    home = Path(tempfile.mkdtemp(prefix="zp-", dir="/var/tmp"))  # short: conmon's socket paths are AF_UNIX
    podman = Podman(home)
    try:
        info = podman.run("info", timeout=60, check=False)
        if info.returncode != 0:
            raise PodmanUnavailableError(f"podman info failed: {info.stderr.strip()[-500:]}")
        yield podman
    finally:
        podman.destroy()


def apt_mirror() -> str | None:
    """The Debian archive URI apt uses on this machine (deb822 .sources or one-line .list files)."""
    apt = Path("/etc/apt")
    for path in sorted(apt.glob("sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.MULTILINE))
            suites = fields.get("Suites", "").split()
            if "deb" in fields.get("Types", "").split() and SUITE in suites and fields.get("URIs"):
                return fields["URIs"].split()[0]
    for path in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list"))]:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s", line.strip() + " ")
            if m and m.group(2) == SUITE:
                return m.group(1)
    return None


def ensure_rootfs_tarball() -> Path:
    """ROOTFS_CACHE, made with debootstrap from the host's apt mirror unless it already exists."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one debootstrap at a time, the others then reuse it
        if ROOTFS_CACHE.exists():
            return ROOTFS_CACHE
        mirror = apt_mirror()
        if mirror is None:
            raise PodmanUnavailableError(f"no Debian {SUITE} mirror in /etc/apt to debootstrap from")
        if shutil.which("debootstrap") is None or os.geteuid() != 0:
            raise PodmanUnavailableError("debootstrap (Debian package, as root) is needed for the base image")
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE_DIR))
        try:
            include = f"--include={','.join(PACKAGES)}"
            subprocess.run(
                ["debootstrap", "--variant=minbase", include, SUITE, str(work / "fs"), mirror],
                check=True,
                capture_output=True,
                timeout=900,
            )
            partial = work / "rootfs.tar"
            subprocess.run(["tar", "-C", str(work / "fs"), "-cf", str(partial), "."], check=True, timeout=300)
            partial.rename(ROOTFS_CACHE)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return ROOTFS_CACHE


def pip_build_args() -> list[str]:
    """podman build options that let pip inside the build reach the index the way the host's pip does.

    The CA bundle (pip's ``cert``, else the usual environment variables)
    goes in as a build secret; an http(s) index other than the default is
    passed as a build argument.  File URLs and find-links of the host are
    meaningless inside the build and are left out.
    """
    conf = _pip_config()
    args: list[str] = []
    cert = os.environ.get("PIP_CERT") or conf.get("cert") or os.environ.get("SSL_CERT_FILE")
    if cert and Path(cert).is_file():
        args += ["--secret", f"id=pip_cert,src={cert}"]
    index = os.environ.get("PIP_INDEX_URL") or conf.get("index-url")
    if index and index.startswith(("http://", "https://")):
        args += ["--build-arg", f"PIP_INDEX_URL_OVERRIDE={index}"]
    return args


def _pip_config() -> dict[str, str]:
    """`pip config list` of the project's pip, as {key without section: value}."""
    done = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    values: dict[str, str] = {}
    for line in done.stdout.splitlines():
        m = re.match(r"^[^.]*\.([\w-]+)='(.*)'$", line.strip())
        if m:
            values.setdefault(m.group(1), m.group(2))
    return values
