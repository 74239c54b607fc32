"""`nixl-etcd serve` as deployed: stock NIXL 1.5.1 agents (the nixl-cu12 wheel,
each in its own process) that the store cannot follow by pid, a dead network
link, a flapping one, and a connection flood; the real binary, a real etcd.

- A remote agent (in a network namespace of the test's own, behind a veth
  pair) is followed by its connection: a 3 s link flap keeps its keys, a cut
  link loses them within keep-alive detection + `--remote-grace`.
- A store in a PID namespace of its own, and one with `--liveness connection`,
  follow a local agent by its connection: its keys stay while it lives and go
  `--remote-grace` after it is killed.
- `--max-connections`: a flood past the cap is refused while an agent that
  holds a connection keeps publishing; once the flood is gone, a new agent
  connects.

Namespaces need root and `ip` (iproute2) or `unshare` (util-linux); those
tests skip, saying why, without them. Each prints what it measured on stderr
(`pytest -s` shows it).
"""

from __future__ import annotations

import ipaddress
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import List, Sequence, Set

import pytest

from conftest import Etcd, wait_until
from store_helpers import HAVE_NIXL, Agent, Serve, holds, keys, names
from store_helpers import fleet, nixl_ns  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not HAVE_NIXL, reason="NIXL (pip nixl-cu12) is not installed")


def report(what: str) -> None:
    print(f"nixl-store deploy: {what}", file=sys.stderr, flush=True)


def need_root_and(tool: str, package: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root (namespaces); running as uid {os.geteuid()}")
    if shutil.which(tool) is None:
        pytest.skip(f"needs `{tool}` ({package}), not on PATH")


def agent_keys(etcd: Etcd, nixl_ns: str, agent: Agent) -> List[str]:
    return sorted(keys(etcd, f"{nixl_ns}/{agent.name}/"))


def published(nixl_ns: str, agent: Agent, *labels: str) -> List[str]:
    """The etcd keys of an agent that published `metadata` and ``labels``."""
    return sorted([f"{nixl_ns}/{agent.name}/", f"{nixl_ns}/{agent.name}/metadata"]
                  + [f"{nixl_ns}/{agent.name}/{x}" for x in labels])


def tcp_connections(pid: int, port: int) -> Set[int]:
    """The local ports of process ``pid``'s established TCP connections to
    port ``port`` (in the process's own network namespace)."""
    inodes: Set[str] = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found: Set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            w = line.split()
            if w[3] == "01" and int(w[2].rsplit(":", 1)[1], 16) == port and w[9] in inodes:
                found.add(int(w[1].rsplit(":", 1)[1], 16))
    return found


# --- network namespaces ------------------------------------------------------


def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def host_networks() -> List[ipaddress.IPv4Network]:
    """Every IPv4 network on a host interface or in a route (but the default)."""
    nets = []
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], stdout=subprocess.PIPE,
                         text=True, timeout=30).stdout
    for line in out.splitlines():
        w = line.split()
        if "inet" in w:
            nets.append(ipaddress.ip_interface(w[w.index("inet") + 1]).network)
    out = subprocess.run(["ip", "-4", "route", "show", "table", "all"], stdout=subprocess.PIPE,
                         text=True, timeout=30).stdout
    for line in out.splitlines():
        for word in line.split()[:2]:
            if word == "default":
                break
            try:
                nets.append(ipaddress.ip_network(word, strict=False))
                break
            except ValueError:
                continue
    return nets


@dataclass
class Link:
    """A network namespace and a veth pair: ``host_dev`` (``host_ip``) here,
    ``ns_dev`` (``ns_ip``) in namespace ``ns``, a /30 of their own."""

    ns: str
    host_dev: str
    ns_dev: str
    host_ip: str
    ns_ip: str

    @property
    def prefix(self) -> List[str]:
        """Runs a command in the namespace."""
        return ["ip", "netns", "exec", self.ns]

    def down(self) -> None:
        ip("-n", self.ns, "link", "set", self.ns_dev, "down")

    def up(self) -> None:
        ip("-n", self.ns, "link", "set", self.ns_dev, "up")

    def remove(self) -> None:
        # Whatever still runs in the namespace was started by this test.
        r = subprocess.run(["ip", "netns", "pids", self.ns], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, timeout=30)
        for pid in r.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for args in (("link", "del", self.host_dev), ("netns", "del", self.ns)):
            try:
                ip(*args)
            except RuntimeError:
                pass


def make_link() -> Link:
    used = host_networks()
    rng = random.SystemRandom()
    for _ in range(100):
        net = ipaddress.ip_network(f"10.213.{rng.randrange(256)}.{4 * rng.randrange(64)}/30")
        if not any(net.overlaps(u) for u in used):
            break
    else:
        raise RuntimeError(f"no free /30 in 10.213.0.0/16 (host networks: {used})")
    tag = uuid.uuid4().hex[:8]
    hosts = list(net.hosts())
    link = Link(ns=f"nxst-{tag}", host_dev=f"nxh{tag}", ns_dev=f"nxn{tag}",
                host_ip=str(hosts[0]), ns_ip=str(hosts[1]))
    try:
        ip("netns", "add", link.ns)
    except RuntimeError as e:
        pytest.skip(f"cannot create a network namespace here: {e}")
    try:
        ip("link", "add", link.host_dev, "type", "veth", "peer", "name", link.ns_dev)
        ip("link", "set", link.ns_dev, "netns", link.ns)
        ip("addr", "add", f"{link.host_ip}/30", "dev", link.host_dev)
        ip("link", "set", link.host_dev, "up")
        ip("-n", link.ns, "addr", "add", f"{link.ns_ip}/30", "dev", link.ns_dev)
        ip("-n", link.ns, "link", "set", link.ns_dev, "up")
        ip("-n", link.ns, "link", "set", "lo", "up")
    except Exception:
        link.remove()
        raise
    return link


@pytest.fixture
def veth():
    """Makes network namespaces with a veth pair to this host; removes them
    (and whatever still runs in them) after the test, failed or not."""
    need_root_and("ip", "iproute2")
    made: List[Link] = []

    def make() -> Link:
        link = make_link()
        made.append(link)
        return link

    yield make
    for link in made:
        link.remove()


# --- test 1: a remote agent, its link flapped, then cut -----------------------

# Small keep-alive numbers (whole seconds): probes every 2 s after 2 s of
# silence, 3 unanswered declare the peer dead: 8 s. A 3 s flap misses at most
# two probes, so the connection survives it.
KA_IDLE, KA_INTERVAL, KA_COUNT = 2, 2, 3
DETECTION = KA_IDLE + KA_INTERVAL * KA_COUNT
GRACE = 5
FLAP_S = 3
MARGIN = 10  # a loaded machine's delays: etcd's revoke, etcdctl, scheduling


def test_a_remote_agent_whose_link_is_cut_loses_its_keys_within_the_bound(
        etcd, nixl_ns, veth, fleet):
    link = veth()
    store = Serve(etcd, nixl_ns, "--remote-grace", str(GRACE),
                  "--keepalive-idle", str(KA_IDLE), "--keepalive-interval", str(KA_INTERVAL),
                  "--keepalive-count", str(KA_COUNT), listen=f"{link.host_ip}:0", log=True)
    fleet.append(store)
    assert store.endpoint.startswith(f"{link.host_ip}:"), store.endpoint
    a = Agent(f"R{names()}", store.env, seed=31, prefix=link.prefix)
    fleet.append(a)
    a.do("publish")
    assert wait_until(lambda: agent_keys(etcd, nixl_ns, a) == published(nixl_ns, a),
                      timeout=20), (agent_keys(etcd, nixl_ns, a), store.log())

    port = int(store.endpoint.rsplit(":", 1)[1])
    conns = tcp_connections(a.pid, port)
    assert conns, "the agent holds no connection to the store"

    # The flap: the namespace's side of the link down for 3 s, then up. The
    # keys must stay for as long as a dead link would take to lose them, and
    # more: a connection lost to the flap would show by then.
    hold = DETECTION + GRACE + 3
    t_down = time.monotonic()
    link.down()
    restored = False

    def flap_keeps_the_keys() -> bool:
        nonlocal restored
        if not restored and time.monotonic() - t_down >= FLAP_S:
            link.up()
            restored = True
        return agent_keys(etcd, nixl_ns, a) == published(nixl_ns, a)

    lost = holds(flap_keeps_the_keys, hold)
    if not restored:
        link.up()
    assert lost is None, (
        f"the agent's keys went {lost:.2f} s after its link went down for {FLAP_S} s "
        f"(held {hold} s: detection {DETECTION} s + grace {GRACE} s + 3)\n{store.log()}")
    assert a.alive()
    report(f"flap: link down {FLAP_S} s, keys kept throughout {hold} s "
           f"(detection {DETECTION} s + grace {GRACE} s + 3 s)")
    # The same connection still works: a publish made after the flap lands.
    a.do("publish_partial", "afterflap")
    assert wait_until(
        lambda: agent_keys(etcd, nixl_ns, a) == published(nixl_ns, a, "afterflap"),
        timeout=20), (agent_keys(etcd, nixl_ns, a), store.log())
    assert tcp_connections(a.pid, port) == conns, "the agent reconnected after the flap"

    # The cut: the link down for good while the agent lives (a dead host, seen
    # from the store: a half-open connection that says nothing).
    t_cut = time.monotonic()
    link.down()
    gone_at: List[float] = []
    alive_then: List[bool] = []

    def gone() -> bool:
        if agent_keys(etcd, nixl_ns, a):
            return False
        gone_at.append(time.monotonic() - t_cut)
        alive_then.append(a.alive())
        return True

    bound = DETECTION + GRACE
    assert wait_until(gone, timeout=bound + MARGIN, step=0.05), (
        f"the agent's keys are still there {bound + MARGIN} s after its link was cut "
        f"(bound: detection {DETECTION} s + grace {GRACE} s)\n{store.log()}")
    took = gone_at[0]
    report(f"cut: keys gone {took:.2f} s after the link went down "
           f"(bound detection {DETECTION} s + grace {GRACE} s = {bound} s)")
    assert alive_then == [True], "the agent died: its keys went with its process, not its link"
    # Not before the grace: the store waited for the dead connection, then the grace.
    assert took >= GRACE, (f"keys gone {took:.2f} s after the cut, before the "
                           f"{GRACE} s grace\n{store.log()}")
    assert a.alive()


# --- tests 2 and 3: a local agent the store follows by its connection -------

L_GRACE = 3
L_KA = ("--keepalive-idle", "1", "--keepalive-interval", "1", "--keepalive-count", "2")
L_DETECTION = 1 + 1 * 2


def local_agent_tracked_by_its_connection(etcd: Etcd, nixl_ns: str, fleet: list, what: str,
                                          *extra: str, prefix: Sequence[str] = ()) -> None:
    store = Serve(etcd, nixl_ns, "--remote-grace", str(L_GRACE), *L_KA, *extra,
                  prefix=prefix, log=True)
    fleet.append(store)
    a = Agent(f"L{names()}", store.env, seed=41)
    fleet.append(a)
    a.do("publish")
    assert wait_until(lambda: agent_keys(etcd, nixl_ns, a) == published(nixl_ns, a),
                      timeout=20), (agent_keys(etcd, nixl_ns, a), store.log())
    # While it lives (its connection open and idle), its keys stay: longer than
    # keep-alive detection and the grace together.
    hold = L_DETECTION + L_GRACE + 2
    lost = holds(lambda: agent_keys(etcd, nixl_ns, a) == published(nixl_ns, a), hold)
    assert lost is None, (f"{what}: the live agent's keys went after {lost:.2f} s\n"
                          f"{store.log()}")
    # Killed: its connection closes; the keys go after the grace (not at
    # once: the store cannot watch the process).
    t_kill = time.monotonic()
    a.kill()
    gone_at: List[float] = []

    def gone() -> bool:
        if agent_keys(etcd, nixl_ns, a):
            return False
        gone_at.append(time.monotonic() - t_kill)
        return True

    assert wait_until(gone, timeout=L_GRACE + MARGIN, step=0.05), (
        f"{what}: the killed agent's keys are still there {L_GRACE + MARGIN} s later "
        f"(grace {L_GRACE} s)\n{store.log()}")
    took = gone_at[0]
    report(f"{what}: keys kept {hold} s while the agent lived; gone {took:.2f} s after "
           f"SIGKILL (grace {L_GRACE} s)")
    assert took >= L_GRACE, (
        f"{what}: keys gone {took:.2f} s after SIGKILL, before the {L_GRACE} s grace: "
        f"the store followed the process, not the connection\n{store.log()}")
    assert store.proc.poll() is None, store.log()


def test_a_store_in_its_own_pid_namespace_tracks_a_local_agent_by_its_connection(
        etcd, nixl_ns, fleet):
    need_root_and("unshare", "util-linux")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.strip()}")
    # --kill-child: the store goes with unshare when the test kills it.
    local_agent_tracked_by_its_connection(
        etcd, nixl_ns, fleet, "pid namespace",
        prefix=["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"])


def test_with_pidfd_off_a_local_agent_is_tracked_by_its_connection(etcd, nixl_ns, fleet):
    local_agent_tracked_by_its_connection(etcd, nixl_ns, fleet, "--liveness connection",
                                          "--liveness", "connection")


# --- test 4: a connection flood -------------------------------------------------

CAP = 32
FLOOD = 100


def answers_ping(endpoint: str) -> bool:
    """A new connection to the store is served: VALIDATE, then PING gets its
    nonce back."""
    host, port = endpoint.rsplit(":", 1)
    nonce = os.getpid() & 0xFFFFFFFF
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(bytes([0]) + struct.pack("=I", 0x3C85F7CE)
                      + bytes([13]) + struct.pack("=I", nonce))
            got = b""
            while len(got) < 4:
                chunk = s.recv(4 - len(got))
                if not chunk:
                    return False
                got += chunk
            return struct.unpack("=I", got)[0] == nonce
    except OSError:
        return False


def closed_by_peer(s: socket.socket) -> bool:
    """True when the store closed ``s`` (it never writes to these)."""
    r, _, _ = select.select([s], [], [], 0)
    if not r:
        return False
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, ConnectionAbortedError):
        return True


def test_a_connection_flood_past_the_cap_is_refused_while_an_agent_keeps_publishing(
        etcd, nixl_ns, fleet):
    store = Serve(etcd, nixl_ns, "--max-connections", str(CAP), log=True)
    fleet.append(store)
    host, port = store.endpoint.rsplit(":", 1)
    t = names()
    a = Agent(f"A{t}", store.env, seed=51)
    fleet.append(a)
    a.do("publish")
    assert wait_until(lambda: agent_keys(etcd, nixl_ns, a) == published(nixl_ns, a),
                      timeout=20), (agent_keys(etcd, nixl_ns, a), store.log())
    conns = tcp_connections(a.pid, int(port))
    held = len(conns)
    assert held >= 1, "the agent holds no connection to the store"
    room = CAP - held

    flood: List[socket.socket] = []
    closed: Set[int] = set()

    def refused() -> int:
        for i, s in enumerate(flood):
            if i not in closed and closed_by_peer(s):
                closed.add(i)
        return len(closed)

    try:
        for _ in range(FLOOD):
            flood.append(socket.create_connection((host, int(port)), timeout=10))
        # Those over the cap are closed at once, with a log line.
        assert wait_until(lambda: refused() >= FLOOD - room, timeout=20), (
            f"{refused()} of {FLOOD} connections closed; {held} held by the agent, "
            f"cap {CAP}\n{store.log()}")
        assert wait_until(lambda: store.log_lines("refused the connection from"), timeout=10), (
            store.log())

        # Meanwhile the agent publishes on its connection.
        a.do("publish_partial", "flood")
        a.do("publish")
        assert wait_until(
            lambda: agent_keys(etcd, nixl_ns, a) == published(nixl_ns, a, "flood"),
            timeout=20), (agent_keys(etcd, nixl_ns, a), store.log())
        # The cap, exactly: the flood's first `room` connections are still open.
        assert refused() == FLOOD - room, (refused(), FLOOD, room, store.log())
        assert tcp_connections(a.pid, int(port)) == conns, "the agent's connection changed"
        lines = store.log_lines("refused the connection from")
        report(f"flood: {FLOOD} connections, cap {CAP}, agent held {held}: "
               f"{len(closed)} refused ({len(lines)} log lines, first: {lines[0]!r}), "
               f"{FLOOD - len(closed)} served; the agent's publish during the flood landed")
    finally:
        for s in flood:
            s.close()

    # The flood gone, a new agent connects and the two find each other.
    assert wait_until(lambda: answers_ping(store.endpoint), timeout=20), store.log()
    b = Agent(f"B{t}", store.env, seed=53)
    fleet.append(b)
    b.do("publish")
    assert b.sees(a)
    assert a.sees(b)
    assert agent_keys(etcd, nixl_ns, b) == published(nixl_ns, b)
    assert store.proc.poll() is None, store.log()
