"""Exit codes: the numbers process managers and health checkers read are part of the contract."""

from __future__ import annotations

from app.cli import build_parser
from app.exits import Exit, Probe


def test_process_exit_codes() -> None:
    assert {e.name: int(e) for e in Exit} == {
        "OK": 0,
        "CRASH_LOOP": 1,
        "CONFIG": 2,
        "BOOT_FAILED": 3,
        "INTERRUPTED": 130,
    }


def test_probe_exit_codes_are_their_own_namespace() -> None:
    assert {e.name: int(e) for e in Probe} == {"HEALTHY": 0, "UNHEALTHY": 1}
    assert not set(Exit.__members__) & set(Probe.__members__)


def test_every_command_is_parsed() -> None:
    parser = build_parser()
    for argv in (["serve"], ["config", "--markdown"], ["client", "q?"], ["check"], ["lab", "--list"], ["bench", "-h"]):
        assert parser.parse_args(argv).command == argv[0]
    assert parser.parse_args(["worker", "--fd", "3", "--slot", "0", "--ready-fd", "4", "--parent", "1"]).fd == 3
