"""Several hosts on one machine: HAProxy (deploy/haproxy.cfg) in front of three servers, PROXY v2.

Built from Linux network namespaces: a switch namespace holding a bridge, a
load-balancer host running HAProxy, three server hosts each running
``python -m app`` (PROXY_PROTOCOL=v2, PROXY_TRUSTED = the load balancer), and a
client host.  Network safety: before anything else a blackhole route for the
test subnet goes into the root namespace, nothing of the subnet is ever
configured there, and every packet starts inside a namespace.  Everything
created is removed in the fixture's ``finally``, on failure too.  The test
skips (saying why) only when namespaces cannot be created.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypedDict

import pytest

from tests.server import REPO, ServerProcess

SUBNET = "10.250.61.0/24"
LB = "10.250.61.2"
CLIENT = "10.250.61.100"
SERVERS = {"zen1": "10.250.61.11", "zen2": "10.250.61.12", "zen3": "10.250.61.13"}
PORT = 1060
ADMIN_PORT = 9100
TAG = f"zh{os.getpid() % 100000}"  # namespace and interface names stay unique and short (IFNAMSIZ 16)
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
Q1, A1 = b"Beautiful is better than?", b"Ugly."


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=check)


def ns_name(host: str) -> str:
    return f"{TAG}-{host}"


def in_ns(host: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns_name(host), *argv]


class NsServer(ServerProcess):
    """``python -m app`` inside a host's namespace (``ip netns exec`` execs: the PID is the master's)."""

    def __init__(self, host: str, env: dict[str, str]) -> None:
        super().__init__(env, wrapper=tuple(in_ns(host)))
        self.port = PORT

    def client_closes(self) -> list[dict[str, object]]:
        """connection_closed lines of connections relayed for the client host."""
        return [e for e in self.find("connection_closed") if str(e.get("peer", "")).startswith(CLIENT + ":")]


@dataclass
class Lab:
    tmp: Path
    stack: ExitStack
    servers: dict[str, NsServer] = field(default_factory=dict)
    workers: set[int] = field(default_factory=set)  # every worker PID seen, for the clean-up
    haproxy: subprocess.Popen[bytes] | None = None

    @property
    def stats_socket(self) -> Path:
        return self.tmp / "haproxy.sock"

    def start_server(self, name: str) -> NsServer:
        env = {
            "HOST": SERVERS[name],
            "PORT": str(PORT),
            "WORKERS": "2",
            "PROXY_PROTOCOL": "v2",
            "PROXY_TRUSTED": f"{LB}/32",
            "ADMIN_PORT": str(ADMIN_PORT),  # loopback of the server's own namespace
            "GRACEFUL_TIMEOUT": "3",
            # in the test's own directory: a SIGKILLed master cannot remove a temporary one
            "PROMETHEUS_MULTIPROC_DIR": str(self.tmp / f"metrics-{name}-{len(self.servers)}"),
        }
        server = NsServer(name, env)
        self.servers[name] = server
        self.stack.callback(server.kill)
        server.wait_event("server_ready", timeout=30)
        self.workers.update(server.worker_pids().values())
        return server

    def status(self) -> dict[str, str]:
        """HAProxy's view of each server: UP, DOWN, ... (``show stat`` on its socket)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "zen_servers" and r["svname"] in SERVERS}

    def wait_status(self, want: Callable[[dict[str, str]], bool], timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                seen = self.status()
            except OSError:
                seen = {}
            if seen and want(seen):
                return seen
            time.sleep(0.1)
        raise AssertionError(f"HAProxy never reached the wanted state; last: {seen}")

    def all_up(self) -> dict[str, str]:
        return self.wait_status(lambda st: all(v == "UP" for v in st.values()) and len(st) == len(SERVERS))


CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys, time
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    q, a = b"Beautiful is better than?", b"Ugly."
    ok, failures, ports = 0, [], []
    deadline = time.monotonic() + 60
    for _ in range(count):
        if time.monotonic() > deadline:
            failures.append("deadline")
            break
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                ports.append(s.getsockname()[1])
                s.sendall(q)
                got = b""
                while not got.endswith(b"."):
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    got += chunk
            if got == a:
                ok += 1
            else:
                failures.append(repr(got))
        except OSError as exc:
            failures.append(repr(exc))
    print(json.dumps({"ok": ok, "failures": failures, "ports": ports}))
    """
)


class ClientResult(TypedDict):
    ok: int
    failures: list[str]
    ports: list[int]


def ask_through_lb(count: int, target: str = LB) -> ClientResult:
    """``count`` connections from the client host, one question each; bounded in count and time."""
    out = sh(*in_ns("client", sys.executable, "-c", CLIENT_SCRIPT, target, str(PORT), str(count)))
    result: ClientResult = json.loads(out.stdout)
    return result


def build_network(stack: ExitStack) -> None:
    """Blackhole route first, then the namespaces, the bridge and one veth per host."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces cannot be created: the 'ip' command (iproute2) is missing")
    added = sh("ip", "route", "add", "blackhole", SUBNET, check=False)
    if added.returncode != 0 and "File exists" not in added.stderr:
        pytest.skip(f"network namespaces cannot be created here: ip route add blackhole: {added.stderr.strip()}")
    if added.returncode == 0:
        stack.callback(sh, "ip", "route", "del", "blackhole", SUBNET, check=False)
    probe = sh("ip", "netns", "add", ns_name("switch"), check=False)
    if probe.returncode != 0:
        pytest.skip(f"network namespaces cannot be created here: {probe.stderr.strip()}")
    stack.callback(sh, "ip", "netns", "del", ns_name("switch"), check=False)
    sh("ip", "-n", ns_name("switch"), "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", ns_name("switch"), "link", "set", "br0", "up")
    hosts = {"lb": LB, "client": CLIENT, **SERVERS}
    for index, (host, address) in enumerate(hosts.items()):
        ns = ns_name(host)
        sh("ip", "netns", "add", ns)
        stack.callback(sh, "ip", "netns", "del", ns, check=False)
        port = f"p{index}"  # the switch side of this host's cable
        sh("ip", "-n", ns_name("switch"), "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", ns_name("switch"), "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def start_haproxy(lab: Lab) -> None:
    if shutil.which("haproxy") is None:
        raise AssertionError("haproxy is not installed: .ci/apt-packages.txt lists it (apt-get install haproxy)")
    env = {
        **os.environ,
        "ZEN_BIND": f"{LB}:{PORT}",
        **{f"ZEN_SERVER_{i}": f"{addr}:{PORT}" for i, addr in enumerate(SERVERS.values(), 1)},
        "ZEN_CHECK_INTER": "300ms",
        "ZEN_CHECK_TIMEOUT": "500ms",
        "ZEN_STATS_SOCKET": str(lab.stats_socket),
    }
    log = (lab.tmp / "haproxy.log").open("wb")
    lab.stack.callback(log.close)
    proc = subprocess.Popen(
        in_ns("lb", "haproxy", "-db", "-f", str(HAPROXY_CFG)), env=env, stdout=log, stderr=subprocess.STDOUT
    )
    lab.haproxy = proc

    def stop() -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

    lab.stack.callback(stop)


def kill_leftover_workers(lab: Lab) -> None:
    for pid in lab.workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with ExitStack() as stack:
        tmp = tmp_path_factory.mktemp("haproxy")
        build_network(stack)
        lab = Lab(tmp, stack)
        stack.callback(kill_leftover_workers, lab)  # runs after every server's kill()
        for name in SERVERS:
            lab.start_server(name)
        start_haproxy(lab)
        try:
            lab.all_up()
        except AssertionError:
            print((tmp / "haproxy.log").read_text(errors="replace")[-3000:])
            raise
        yield lab


def test_answers_flow_with_the_real_client_address(lab: Lab) -> None:
    lab.all_up()
    before = {name: len(s.client_closes()) for name, s in lab.servers.items()}
    result = ask_through_lb(30)
    assert result["failures"] == []
    assert result["ok"] == 30
    ports = set(result["ports"])
    seen: set[int] = set()
    for name, server in lab.servers.items():
        deadline = time.monotonic() + 10
        while len(server.client_closes()) - before[name] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        fresh = server.client_closes()[before[name] :]
        assert fresh, f"{name} got no connection: leastconn spreads equal loads round-robin"
        for event in fresh:
            assert str(event["via"]).startswith(LB + ":"), event  # relayed by the load balancer
            assert event["answered"] == 1
            seen.add(int(str(event["peer"]).rsplit(":", 1)[1]))
    wait_until(lambda: ports <= collect_ports(lab), "every client port in some server's log")
    assert seen <= ports


def collect_ports(lab: Lab) -> set[int]:
    return {int(str(e["peer"]).rsplit(":", 1)[1]) for s in lab.servers.values() for e in s.client_closes()}


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.05)


def test_health_checks_arrive_as_proxy_v2_local(lab: Lab) -> None:
    lab.all_up()
    assert ask_through_lb(6)["ok"] == 6  # leastconn round-robins: zen1 relays some of these
    server = lab.servers["zen1"]

    def checked() -> bool:
        return any(
            str(e["peer"]).startswith(LB + ":") and e["answered"] == 1 and "via" not in e
            for e in server.find("connection_closed")
        )

    wait_until(checked, "a health check (LOCAL header, the LB's own address) answered by zen1")

    def scraped() -> bool:  # workers flush their counters once a second
        text = sh(*in_ns("zen1", sys.executable, "-c", SCRAPE, str(ADMIN_PORT))).stdout
        return 'zen_proxy_headers_total{command="LOCAL"}' in text and 'zen_proxy_headers_total{command="PROXY"}' in text

    wait_until(scraped, "zen1's /metrics counting LOCAL (checks) and PROXY (clients) headers")


SCRAPE = (
    "import sys, urllib.request; "
    "print(urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}/metrics', timeout=5).read().decode())"
)


def test_direct_connection_bypassing_the_lb_is_refused(lab: Lab) -> None:
    server = lab.servers["zen1"]
    start = len(server.events)
    result = ask_through_lb(1, target=SERVERS["zen1"])
    assert result["ok"] == 0
    event = server.wait_event("connection_closed", lambda e: str(e["peer"]).startswith(CLIENT + ":"), start=start)
    assert event["reason"] == "proxy_untrusted"
    assert event["answered"] == 0


def test_link_down_moves_traffic_and_the_host_rejoins(lab: Lab) -> None:
    lab.all_up()
    index = list(SERVERS).index("zen2") + 2  # veth p0 = lb, p1 = client, then the servers
    switch_port = f"p{index}"
    down = partial(sh, "ip", "-n", ns_name("switch"), "link", "set", switch_port, "down")
    up = partial(sh, "ip", "-n", ns_name("switch"), "link", "set", switch_port, "up")
    lab.stack.callback(up)  # the next test starts with every cable in
    down()
    lab.wait_status(lambda st: st["zen2"].startswith("DOWN") and st["zen1"] == st["zen3"] == "UP")
    zen2 = lab.servers["zen2"]
    others = [lab.servers["zen1"], lab.servers["zen3"]]
    before = len(zen2.client_closes())
    before_others = sum(len(s.client_closes()) for s in others)
    result = ask_through_lb(30)
    assert result["failures"] == []
    assert result["ok"] == 30
    wait_until(lambda: sum(len(s.client_closes()) for s in others) - before_others == 30, "zen1 and zen3 serving all")
    assert len(zen2.client_closes()) == before
    up()
    lab.all_up()
    result = ask_through_lb(30)
    assert result["ok"] == 30
    wait_until(lambda: len(zen2.client_closes()) > before, "zen2 serving again after it rejoined")


def test_killed_master_moves_traffic_and_the_restarted_host_rejoins(lab: Lab) -> None:
    lab.all_up()
    zen3 = lab.servers["zen3"]
    zen3.proc.send_signal(signal.SIGKILL)  # the master; its workers get SIGTERM from the kernel (PDEATHSIG)
    zen3.proc.wait(10)
    lab.wait_status(lambda st: st["zen3"].startswith("DOWN") and st["zen1"] == st["zen2"] == "UP")
    others = [lab.servers["zen1"], lab.servers["zen2"]]
    before = sum(len(s.client_closes()) for s in others)
    result = ask_through_lb(30)
    assert result["failures"] == []
    assert result["ok"] == 30
    wait_until(lambda: sum(len(s.client_closes()) for s in others) - before == 30, "zen1 and zen2 serving all 30")
    for pid in zen3.worker_pids().values():
        wait_until(partial(pid_gone, pid), f"worker {pid} of the killed master exiting")
    fresh = lab.start_server("zen3")
    lab.all_up()
    result = ask_through_lb(30)
    assert result["ok"] == 30
    wait_until(lambda: len(fresh.client_closes()) > 0, "the restarted zen3 serving")


def pid_gone(pid: int) -> bool:
    """Exited (a zombie left for init to reap counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state == "Z"
