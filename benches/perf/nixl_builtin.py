#!/usr/bin/env python3
"""Latency of NIXL's built-in etcd metadata exchange, for the perf benchmark.

    python3 benches/perf/nixl_builtin.py ENDPOINT N

Stock NIXL agents (PyPI `nixl`, UCX backend) in ONE process, so that every
interval is read from one clock. The exchange is switched on the way NIXL
documents it: NIXL_ETCD_ENDPOINTS, plus a NIXL_ETCD_NAMESPACE unique to this
run, so nothing an earlier run left in etcd is seen.

Two observer agents live for the whole run: `waiter` asks for each publisher
before it publishes, `late` asks after. Every sample uses a fresh publisher
agent, because a NIXL peer never reloads a name it has dropped:

  publish_to_visible_us   waiter.fetch_remote_metadata(name); the publisher
                          is created, and at least PRE_SEND_WAIT_S after the
                          fetch it publishes: from just before
                          pub.send_local_metadata() until
                          waiter.check_remote_metadata(name) is true.
  fetch_after_publish_us  the blob is in etcd already (the waiter has it):
                          from late.fetch_remote_metadata(name) until
                          late.check_remote_metadata(name) is true.
  invalidation_us         both observers hold the agent: from just before
                          pub.invalidate_local_metadata() until
                          waiter.check_remote_metadata(name) is false.

Checks are polled in a tight loop (POLL_S sleep). Sampling stops early when
the time budget is spent (NIXL_BUILTIN_BUDGET_S, default 52 s); the notes say
how many samples were taken of the N asked for. One warm-up sample comes first
and is not recorded.

Prints one JSON object on stdout:
  {"publish_to_visible_us": [...], "fetch_after_publish_us": [...],
   "invalidation_us": [...], "notes": "..."}
NIXL's own log lines (its Python package and UCX write to stdout) go to
stderr. Exit status: 0 success, 2 bad arguments, 3 NIXL not importable,
4 etcd not reachable, 5 the exchange does not work.
"""

import json
import os
import sys
import time
import urllib.request
import uuid

# Sleep between two polls of check_remote_metadata.
POLL_S = 0.0002
# Time between the waiter's fetch and the publish: 10 ms, the same scenario as
# nixl-etcd's discovery row (a waiter already blocked when the prefill
# publishes, as when a decode engine waits for a prefill that is starting).
# NIXL starts its watch at its get's revision, which etcd treats as a past
# revision and catches up only on its 100 ms sync loop; a publish within that
# window waits for the loop (measured here: median 36 ms with a 50 ms pause,
# 4 ms with 150 ms). Set NIXL_BUILTIN_PRE_SEND_WAIT_S=0.15 for NIXL's most
# favourable case.
PRE_SEND_WAIT_S = float(os.environ.get("NIXL_BUILTIN_PRE_SEND_WAIT_S", "0.01"))
# Longest wait for a publish to become visible (NIXL's fetch itself gives up
# after its 5 s watch timeout).
VISIBLE_TIMEOUT_S = 6.0
# Longest wait for an invalidation to reach the measured peer before it counts
# as missed (it normally takes ~0.1 s), and for the late peer, not measured.
INVALIDATION_TIMEOUT_S = 2.0
LATE_DROP_TIMEOUT_S = 0.5
SERIES = ("publish_to_visible_us", "fetch_after_publish_us", "invalidation_us")


def die(code, msg):
    print(f"nixl_builtin.py: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def normalize_endpoints(raw):
    eps = []
    for ep in raw.split(","):
        ep = ep.strip().rstrip("/")
        if ep:
            eps.append(ep if "://" in ep else "http://" + ep)
    return eps


def etcd_healthy(ep):
    try:
        with urllib.request.urlopen(ep + "/health", timeout=3) as r:
            return r.status == 200
    except Exception:
        return False


def wait_until(pred, timeout_s):
    """Polls pred; returns the perf_counter() at which it first held, or None."""
    deadline = time.perf_counter() + timeout_s
    while True:
        if pred():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            return None
        time.sleep(POLL_S)


def pct(values, p):
    """Nearest-rank percentile, as benches/perf/stats.rs computes it."""
    if not values:
        return float("nan")
    v = sorted(values)
    rank = max(1, -(-len(v) * p // 100))
    return v[int(min(rank, len(v))) - 1]


def main(argv):
    if len(argv) != 3:
        die(2, "usage: nixl_builtin.py ENDPOINT N")
    eps = normalize_endpoints(argv[1])
    try:
        n = int(argv[2])
    except ValueError:
        n = 0
    if not eps or n <= 0:
        die(2, f"bad arguments {argv[1:]!r}: want an etcd endpoint and N > 0")
    budget_s = float(os.environ.get("NIXL_BUILTIN_BUDGET_S", "52"))
    debug = bool(os.environ.get("NIXL_BUILTIN_DEBUG"))

    # Keep stdout for the JSON alone: fd 1 (and sys.stdout) point at stderr
    # until the result is written to the saved descriptor.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

    if not any(etcd_healthy(ep) for ep in eps):
        die(4, f"etcd not reachable at {','.join(eps)}")

    namespace = f"/nixl-etcd-bench/builtin-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.environ["NIXL_ETCD_ENDPOINTS"] = ",".join(eps)
    os.environ["NIXL_ETCD_NAMESPACE"] = namespace

    try:
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
    except Exception as e:  # ImportError, or a wheel that does not load
        die(3, f"NIXL is not installed for {sys.executable} ({type(e).__name__}: {e}); "
               "pip install nixl")
    nixl_version = "?"
    try:
        from importlib.metadata import version
        nixl_version = version("nixl")
    except Exception:
        pass

    # UCX's progress thread (on by default) busy-polls the data path, which
    # the metadata exchange never uses; with three agents in one process it
    # would only measure CPU contention (on 2 cores: agent creation 130 ms
    # instead of 26 ms, fetch p90 16 ms instead of 2 ms). It is off here;
    # NIXL_BUILTIN_PROG_THREAD=1 turns it back on.
    prog = os.environ.get("NIXL_BUILTIN_PROG_THREAD", "0") == "1"
    # The observers' checks run in this thread while NIXL's agent thread loads
    # and drops remote agents: they take the lock NIXL itself uses for agents
    # with a background thread (STRICT). Publishers keep the default.
    observer_cfg = nixl_agent_config(
        enable_prog_thread=prog, sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    pub_cfg = nixl_agent_config(enable_prog_thread=prog)
    tag = uuid.uuid4().hex[:6]
    try:
        waiter = nixl_agent(f"bench-waiter-{tag}", observer_cfg)
        late = nixl_agent(f"bench-late-{tag}", observer_cfg)
    except Exception as e:
        die(5, f"cannot create a NIXL agent with the UCX backend: {type(e).__name__}: {e}")

    res = {k: [] for k in SERIES}
    missed = {"visible": 0, "fetch_after_publish": 0, "invalidation_waiter": 0,
              "invalidation_late": 0}
    phase = {"create": [], "destroy": []}
    taken = 0
    stop_reason = ""
    t_begin = time.perf_counter()
    # i == -1 is the warm-up sample.
    for i in range(-1, n):
        if time.perf_counter() - t_begin > budget_s:
            stop_reason = f"stopped by the {budget_s:.0f} s time budget"
            break
        name = f"bench-pub-{tag}-{i + 1}"
        record = i >= 0

        # (a) The waiter asks first; the publisher is created after that and
        # publishes no sooner than PRE_SEND_WAIT_S after the fetch.
        t_fetch = time.perf_counter()
        waiter.fetch_remote_metadata(name)
        try:
            pub = nixl_agent(name, pub_cfg)
        except Exception as e:
            stop_reason = f"stopped: creating publisher {name} failed ({e})"
            print(f"nixl_builtin.py: {stop_reason}", file=sys.stderr)
            break
        phase["create"].append(time.perf_counter() - t_fetch)
        rest = PRE_SEND_WAIT_S - (time.perf_counter() - t_fetch)
        if rest > 0:
            time.sleep(rest)
        taken += record
        t0 = time.perf_counter()
        pub.send_local_metadata()
        t1 = wait_until(lambda: waiter.check_remote_metadata(name), VISIBLE_TIMEOUT_S)
        if t1 is None:
            missed["visible"] += 1
            print(f"nixl_builtin.py: {name} never became visible", file=sys.stderr)
            if not res["publish_to_visible_us"]:
                die(5, "a publish never became visible to the waiting peer: "
                       "NIXL's etcd exchange does not work here")
            pub.invalidate_local_metadata()
            time.sleep(0.2)
            del pub
            continue
        if record:
            res["publish_to_visible_us"].append((t1 - t0) * 1e6)

        # (a2) The blob is in etcd already; the late observer asks now.
        t0 = time.perf_counter()
        late.fetch_remote_metadata(name)
        t1 = wait_until(lambda: late.check_remote_metadata(name), VISIBLE_TIMEOUT_S)
        if t1 is None:
            missed["fetch_after_publish"] += 1
        elif record:
            res["fetch_after_publish_us"].append((t1 - t0) * 1e6)

        # (b) Invalidation, as the waiter sees it.
        t0 = time.perf_counter()
        pub.invalidate_local_metadata()
        t1 = wait_until(lambda: not waiter.check_remote_metadata(name), INVALIDATION_TIMEOUT_S)
        if t1 is None:
            missed["invalidation_waiter"] += 1
            waiter.remove_remote_agent(name)  # drop it by hand, untimed
        elif record:
            res["invalidation_us"].append((t1 - t0) * 1e6)
        # The late observer must drop it too before the publisher goes away.
        if wait_until(lambda: not late.check_remote_metadata(name),
                      LATE_DROP_TIMEOUT_S) is None:
            missed["invalidation_late"] += 1
            late.remove_remote_agent(name)
        t = time.perf_counter()
        del pub
        phase["destroy"].append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t_begin

    # Empty the run's namespace: the observers' own marker keys.
    for a in (waiter, late):
        try:
            a.invalidate_local_metadata()
        except Exception:
            pass
    time.sleep(0.2)

    if not res["publish_to_visible_us"]:
        die(5, "no sample could be taken")
    if debug:
        for k, v in phase.items():
            print(f"phase {k}: median {1e3 * pct(v, 50):.1f} ms, max {1e3 * max(v):.1f} ms",
                  file=sys.stderr)

    n_missed = sum(missed.values())
    notes = (
        f"NIXL {nixl_version} built-in etcd exchange (NIXL_ETCD_ENDPOINTS, namespace "
        f"{namespace}): stock agents, UCX backend, UCX progress thread "
        f"{'on' if prog else 'off'}, the two peers in sync mode STRICT, all in one "
        "Python process. "
        f"{taken} samples of {n} asked for"
        + (f" ({stop_reason})" if stop_reason else "")
        + f", in {elapsed:.1f} s, after 1 warm-up; a fresh publisher agent per sample "
        f"(creation median {1e3 * pct(phase['create'], 50):.0f} ms). "
        "publish_to_visible: the peer calls fetch_remote_metadata, the publisher is "
        f"created and calls send_local_metadata at least {1e3 * PRE_SEND_WAIT_S:.0f} ms "
        "later; time from send to the peer's check_remote_metadata true. "
        "fetch_after_publish: the blob already in etcd; time from a second peer's "
        "fetch_remote_metadata to its check true. invalidation: time from "
        "invalidate_local_metadata to the first peer's check false. Checks polled every "
        f"{1e3 * POLL_S:.1f} ms. "
        + (f"Missed transitions, not in the samples (none within {VISIBLE_TIMEOUT_S:.0f} s "
           f"for a fetch, {INVALIDATION_TIMEOUT_S:.0f} s for the first peer's invalidation, "
           f"{LATE_DROP_TIMEOUT_S:.1f} s for the second peer's, which had fetched the agent "
           f"a few ms before it was invalidated): {missed}."
           if n_missed else "No transition was missed.")
    )
    res["notes"] = notes
    json_out.write(json.dumps(res) + "\n")
    json_out.flush()
    for k in SERIES:
        v = res[k]
        print(f"nixl_builtin.py: {k}: n={len(v)} p50={pct(v, 50):.0f} p90={pct(v, 90):.0f} "
              f"p99={pct(v, 99):.0f} max={max(v) if v else float('nan'):.0f}", file=sys.stderr)
    if n_missed:
        print(f"nixl_builtin.py: missed transitions: {missed}", file=sys.stderr)
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
