"""Which loop ``LOOP`` resolves to (``app.server.loops``), with uvloop importable and with it blocked.

uvloop is blocked the way a missing install looks to the import system:
``sys.modules["uvloop"] = None`` makes ``import uvloop`` raise ImportError.
"""

from __future__ import annotations

import asyncio
import inspect
import sys

import pytest

from app.config import ConfigError, load
from app.lab.shell import run_asyncio
from app.server import loops


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)


def _loop_it_runs(chosen: loops.Chosen) -> str:
    seen: list[str] = []

    async def main() -> None:
        seen.append(loops.name_of(asyncio.get_running_loop()))

    chosen.run(main())
    return seen[0]


@pytest.mark.parametrize(("wanted", "name"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_with_uvloop_each_choice_runs_its_loop(wanted: str, name: str) -> None:
    chosen = loops.choose_loop(wanted)
    assert chosen.name == name
    assert chosen.fallback == ""
    assert _loop_it_runs(chosen) == name


@pytest.mark.usefixtures("no_uvloop")
def test_auto_without_uvloop_falls_back_to_asyncio_and_says_why() -> None:
    chosen = loops.choose_loop("auto")
    assert chosen.name == "asyncio"
    assert "uvloop" in chosen.fallback
    assert _loop_it_runs(chosen) == "asyncio"


@pytest.mark.usefixtures("no_uvloop")
def test_uvloop_without_uvloop_is_an_error_that_says_what_to_do() -> None:
    with pytest.raises(loops.LoopUnavailableError) as info:
        loops.choose_loop("uvloop")
    assert "LOOP=uvloop" in str(info.value)
    assert "LOOP=asyncio" in str(info.value)
    assert loops.choose_loop("asyncio").name == "asyncio"


@pytest.mark.usefixtures("no_uvloop")
def test_a_lab_variant_named_for_uvloop_never_runs_on_another_loop() -> None:
    ran: list[bool] = []

    async def main() -> None:
        ran.append(True)

    coro = main()
    with pytest.raises(loops.LoopUnavailableError):
        run_asyncio(coro, uvloop=True)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED  # not left un-awaited
    assert not ran
    assert run_asyncio(main(), uvloop=False) == 0
    assert ran == [True]


def test_name_of_tells_the_loops_apart() -> None:
    import uvloop  # noqa: PLC0415

    for factory, name in [(uvloop.new_event_loop, "uvloop"), (asyncio.new_event_loop, "asyncio")]:
        loop = factory()
        try:
            assert loops.name_of(loop) == name
        finally:
            loop.close()


@pytest.mark.parametrize(("value", "loop"), [(" UVLOOP ", "uvloop"), ("Asyncio", "asyncio"), ("auto", "auto")])
def test_the_setting_is_case_insensitive(monkeypatch: pytest.MonkeyPatch, value: str, loop: str) -> None:
    monkeypatch.setenv("LOOP", value)
    assert load(None).loop == loop


def test_the_setting_defaults_to_auto_and_rejects_other_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOP", raising=False)
    assert load(None).loop == "auto"
    monkeypatch.setenv("LOOP", "trio")
    with pytest.raises(ConfigError, match="invalid LOOP='trio'"):
        load(None)
