"""The unit, integration and system suites on Python 3.13: Debian trixie's python3, in a container.

The host runs everything on its Python (3.11); this test runs the suites
whose subject is the Python code itself on trixie's python3 (3.13), where
asyncio's shutdown semantics differ (3.12: ``Server.wait_closed()`` waits
for every handler; 3.13: ``Server.close_clients()``).  Inside a container
on the cached trixie root filesystem (tests/deploy/podman.py): a copy of
the worktree (no .venv, no caches), a venv of that python3 with the
project and its test tools, then pytest.  The container shares the host's
network namespace (the suites listen on 127.0.0.1, and pip reaches the
host's index with the host's CA bundle) and its open-files limit;
catatonit is PID 1, as an init is on the host, so the workers a killed
master leaves behind are reaped instead of piling up as zombies of pytest
and pytest keeps the signal behaviour it has everywhere else.

Host-only, and why:

- tests/deploy: podman inside podman, supervisord and systemd files; they
  test the deployment files, not the interpreter (the image itself is
  built and run on 3.13 by test_container.py);
- tests/system/test_haproxy_hosts.py: ``ip netns`` needs CAP_SYS_ADMIN and
  a shared /run/netns, i.e. a privileged container nested in this one, plus
  haproxy and iproute2 in the root filesystem; what it adds over
  test_master.py is the HAProxy configuration and the PROXY header path,
  which the unit and integration suites cover on 3.13;
- tests/chaos: sysctls under /proc/sys, RLIMIT_NOFILE above the host's,
  TCP_REPAIR (CAP_NET_ADMIN) and load, all about the kernel and the host.

It adds about 2.5 minutes to ``make test`` (the inner suites take as long
as on the host, pip 20 to 30 s), and about 1.5 more when the trixie root
filesystem must first be debootstrapped (once per cache).  pip's own cache
is not kept: the index here answers without the caching headers pip's
HTTP cache needs, so it would stay empty.
"""

from __future__ import annotations

import re
import resource
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy.podman import SUITES, pip_run_args, ulimit_args
from tests.deploy.podman import Podman as PodmanCli
from tests.deploy.support import REPO

SUITE = "trixie"
INNER_TESTS = ("tests/unit", "tests/integration", "tests/system")
HOST_ONLY = ("tests/system/test_haproxy_hosts.py",)
#: podman run --init's PID 1 (Debian's podman only recommends the package).
CATATONIT = Path("/usr/libexec/podman/catatonit")
INNER_TIMEOUT = 1500  # the inner suites take about 2 minutes, pip well under one

pytestmark = [pytest.mark.slow, pytest.mark.timeout(INNER_TIMEOUT + 600)]

# The system packages the inner suites use beside Python (as .ci/apt-packages.txt on the host):
# openssl makes the TLS tests' certificates, gcc and make build bench/'s C programs, python3-dev
# (Python.h) with gcc lets tests/unit/test_build.py compile the hot modules with mypyc, haproxy
# runs the TLS offload and passthrough configurations, valgrind runs bench/instructions.py.
SYSTEM_PACKAGES = "openssl gcc make libc6-dev python3-dev haproxy valgrind"
# Install those from the rootfs's own apt mirror, copy the worktree without what belongs to the
# host's Python (its venv, caches, bytecode, built docs and C programs), make a venv of the
# image's python3, install the project with its test tools, run pytest.
SCRIPT = r"""
set -eu
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends PACKAGES >/dev/null
mkdir /src
tar -C /mnt/src --exclude=./.venv --exclude=./.venv-compiled --exclude=./build --exclude=./.git \
    --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache --exclude=.hypothesis \
    --exclude=./site --exclude=./bench/build -cf - . \
  | tar -C /src -xf -
cd /src
python3 -m venv /opt/venv
/opt/venv/bin/pip install --quiet --disable-pip-version-check --editable '.[test]'
/opt/venv/bin/python -c 'import sys; print("inner python", *sys.version_info[:3])'
exec /opt/venv/bin/python -m pytest -p no:cacheprovider -q "$@"
""".replace("PACKAGES", SYSTEM_PACKAGES)


def test_unit_integration_and_system_suites_pass_on_python_313(
    podman: PodmanCli, base_image: Callable[[str], str]
) -> None:
    if not CATATONIT.exists():
        print(f"SKIP Python 3.13 run: {CATATONIT} is missing (Debian package 'catatonit', in .ci/apt-packages.txt)")
        pytest.skip("podman run --init needs catatonit")
    base = base_image(SUITE)
    done = podman.run(
        "run",
        "--rm",
        "--init",
        "--network",
        "host",
        *ulimit_args(nofile=resource.getrlimit(resource.RLIMIT_NOFILE)),
        "--volume",
        f"{REPO}:/mnt/src:ro",
        *pip_run_args(),
        base,
        "sh",
        "-c",
        SCRIPT,
        "sh",
        "--timeout=300",
        *INNER_TESTS,
        *(f"--ignore={path}" for path in HOST_ONLY),
        timeout=INNER_TIMEOUT,
        check=False,
    )
    out = done.stdout.splitlines()
    tail = "\n".join(out[-60:]) + "\n" + done.stderr[-3000:]
    version = next((line.split()[2:] for line in out if line.startswith("inner python ")), None)
    print("\n".join(line for line in out if line.startswith(("inner python ", "SKIPPED", "FAILED", "ERROR"))))
    summary, counts = _summary(out)
    print(f"inner pytest on Python {'.'.join(version or ['?'])}: {summary}")
    assert version is not None, tail
    assert tuple(map(int, version[:2])) == SUITES[SUITE], tail
    assert done.returncode == 0, tail
    assert counts.get("passed", 0) > 0, tail
    assert counts.get("failed", 0) == 0, tail
    assert counts.get("errors", 0) + counts.get("error", 0) == 0, tail


def _summary(lines: list[str]) -> tuple[str, dict[str, int]]:
    """pytest's last line ("12 passed, 1 skipped in 3.45s") and its counts by outcome."""
    for line in reversed(lines):
        m = re.match(r"^=*\s*(.*?) in [\d.]+s\b", line)
        if m:
            return m.group(1), {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", m.group(1))}
    return "(no summary line)", {}
