"""Fixtures of the deployment tests: one private podman storage for the whole session.

Owns: opening it once (so each Debian base image is imported once, for the
image test and the Python 3.13 run alike) and removing it at the end.

Never: touches the host's own podman storage; a test that needs podman
where it cannot run skips, saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.deploy.podman import Podman, PodmanUnavailableError, open_podman


@pytest.fixture(scope="session")
def podman() -> Iterator[Podman]:
    try:
        with open_podman() as p:
            yield p
    except PodmanUnavailableError as exc:
        print(f"SKIP podman test: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def base_image(podman: Podman) -> Callable[[str], str]:
    """podman.base_image, skipping (saying why) when the Debian root filesystem cannot be made here."""

    def get(suite: str) -> str:
        try:
            return podman.base_image(suite)
        except PodmanUnavailableError as exc:
            print(f"SKIP podman test: {exc}")
            pytest.skip(str(exc))

    return get
