"""Podman for the deployment tests: a private storage, local Debian base images, the host's pip settings.

Owns: running podman against a storage of its own (a temporary directory
under /var/tmp, removed afterwards, so no image or container of these tests
outlives it and the host's own podman storage is never touched), the
repository's containers.conf (runc, lower ulimits), the cached Debian root
filesystems the base images are imported from (one per tested Python: see
SUITES), and reading the host's apt mirror and pip settings.

Never: names a registry or mirror host (they are read from this machine's
apt and pip configuration) or pulls from a container registry.

The things kept between runs live in CACHE_DIR: per Debian release a tarball
of a debootstrapped root filesystem with python3 and python3-venv (about
270 MB each, 45 to 90 s to rebuild); delete one to force a fresh one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

from tests.deploy.support import REPO, VENV_BIN

CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"
#: The Debian releases the tests build on, and the python3 each ships: the
#: Pythons the project is tested on (the host's 3.11 and trixie's 3.13).
SUITES = {"bookworm": (3, 11), "trixie": (3, 13)}
PACKAGES = ("python3", "python3-venv")
CACHE_DIR = Path("/var/tmp/zen-server-test-cache")
#: Where the CA bundle of the host's pip is mounted inside a container.
CONTAINER_CA = "/run/zen-test-ca.crt"


class PodmanUnavailableError(Exception):
    """Podman cannot run here at all (the reason is the message)."""


class Podman:
    """podman with a private root, runroot and tmpdir, and the repository's containers.conf."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
        self._bases: dict[str, str] = {}

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

    def base_image(self, suite: str) -> str:
        """The Debian ``suite`` root filesystem as an image of this storage (imported once, debootstrapped once)."""
        if suite not in self._bases:
            tag = f"localhost/zen-test-base:{suite}"
            self.run("import", str(ensure_rootfs_tarball(suite)), tag, timeout=300)
            self._bases[suite] = tag
        return self._bases[suite]

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


def ulimit_args(**limits: tuple[int, int]) -> list[str]:
    """podman run --ulimit options: containers.conf's default_ulimits, ``limits`` (name=(soft, hard)) replacing them.

    One --ulimit on the command line drops every default of containers.conf
    (podman then asks for its own nproc, above what this host lets a
    container set), so the defaults are always repeated.
    """
    defaults = tomllib.loads(CONTAINERS_CONF.read_text())["containers"]["default_ulimits"]
    merged = {name: value for name, _, value in (str(u).partition("=") for u in defaults)}
    merged |= {name: f"{soft}:{hard}" for name, (soft, hard) in limits.items()}
    return [f"--ulimit={name}={value}" for name, value in merged.items()]


def host_suite() -> str:
    """This machine's Debian release (VERSION_CODENAME), the suite its apt sources name."""
    os_release = Path("/etc/os-release")
    text = os_release.read_text() if os_release.exists() else ""
    m = re.search(r"^VERSION_CODENAME=\"?(\w+)", text, re.MULTILINE)
    return m.group(1) if m else "bookworm"


def apt_mirror() -> str | None:
    """The Debian archive URI apt uses on this machine for its own release (deb822 or one-line sources).

    Every release lives in the same archive, so the one mirror serves the
    debootstrap of any suite in SUITES.
    """
    suite = host_suite()
    apt = Path("/etc/apt")
    for path in sorted(apt.glob("sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.MULTILINE))
            suites = fields.get("Suites", "").split()
            if "deb" in fields.get("Types", "").split() and suite in suites and fields.get("URIs"):
                return fields["URIs"].split()[0]
    for path in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list"))]:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s", line.strip() + " ")
            if m and m.group(2) == suite:
                return m.group(1)
    return None


def rootfs_cache(suite: str) -> Path:
    """The cached root filesystem tarball of Debian ``suite``."""
    return CACHE_DIR / f"debian-{suite}-{'-'.join(PACKAGES)}.tar"


def ensure_rootfs_tarball(suite: str) -> Path:
    """rootfs_cache(suite), made with debootstrap from the host's apt mirror unless it already exists."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    cached = rootfs_cache(suite)
    with (CACHE_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one debootstrap at a time, the others then reuse it
        if cached.exists():
            return cached
        mirror = apt_mirror()
        if mirror is None:
            raise PodmanUnavailableError(f"no Debian {host_suite()} mirror in /etc/apt to debootstrap from")
        if shutil.which("debootstrap") is None or os.geteuid() != 0:
            raise PodmanUnavailableError("debootstrap (Debian package, as root) is needed for the base image")
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE_DIR))
        try:
            include = f"--include={','.join(PACKAGES)}"
            subprocess.run(
                ["debootstrap", "--variant=minbase", include, suite, str(work / "fs"), mirror],
                check=True,
                capture_output=True,
                timeout=900,
            )
            partial = work / "rootfs.tar"
            subprocess.run(["tar", "-C", str(work / "fs"), "-cf", str(partial), "."], check=True, timeout=300)
            partial.rename(cached)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return cached


def pip_build_args() -> list[str]:
    """podman build options that let pip inside the build reach the index the way the host's pip does.

    The CA bundle (pip's ``cert``, else the usual environment variables)
    goes in as a build secret; an http(s) index other than the default is
    passed as a build argument.  File URLs and find-links of the host are
    meaningless inside the build and are left out.
    """
    cert, index = _pip_cert_and_index()
    args: list[str] = []
    if cert:
        args += ["--secret", f"id=pip_cert,src={cert}"]
    if index:
        args += ["--build-arg", f"PIP_INDEX_URL_OVERRIDE={index}"]
    return args


def pip_run_args() -> list[str]:
    """podman run options that let pip inside a container reach the index the way the host's pip does.

    The same two settings as pip_build_args: the CA bundle, mounted read-only
    at CONTAINER_CA and named by PIP_CERT, and an http(s) index.
    """
    cert, index = _pip_cert_and_index()
    args: list[str] = []
    if cert:
        args += ["--volume", f"{cert}:{CONTAINER_CA}:ro", "--env", f"PIP_CERT={CONTAINER_CA}"]
    if index:
        args += ["--env", f"PIP_INDEX_URL={index}"]
    return args


def _pip_cert_and_index() -> tuple[str | None, str | None]:
    """The host pip's CA bundle (an existing file) and its http(s) index URL, each None when absent."""
    conf = _pip_config()
    cert = os.environ.get("PIP_CERT") or conf.get("cert") or os.environ.get("SSL_CERT_FILE")
    index = os.environ.get("PIP_INDEX_URL") or conf.get("index-url")
    return (
        cert if cert and Path(cert).is_file() else None,
        index if index and index.startswith(("http://", "https://")) else None,
    )


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
