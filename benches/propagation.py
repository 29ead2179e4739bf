"""Purge propagation latency, driven by benches/propagation.sh.

    python3 benches/propagation.py A_PORT COUNT PEER_URLS PEER_ADMIN_PORTS

PEER_URLS and PEER_ADMIN_PORTS are comma-separated, in the same order. Over one keep-alive
connection to corral A: COUNT sequential `PURGE /bench/wait/<i>?wait=peers` (the answer comes
once every peer has applied the purge and answered: the round trip bounds the time from A's
accept to every peer having applied it), then COUNT plain PURGEs (answered when applied at A
and queued) for the ratio. Prints p50 / p99 in ms of both; exits 1 if an answer is not 200, a
peer's result is not "delivered", or a peer's applied count does not reach what A sent.
"""

import http.client
import json
import math
import sys
import time

HOST = "bench.test"
WARMUP = 50


def fail(msg):
    print(f"propagation.py: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def percentile(sorted_ms, q):
    """Nearest rank."""
    return sorted_ms[max(0, math.ceil(q * len(sorted_ms)) - 1)]


def applied(admin_port):
    c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    for line in text.splitlines():
        if line.startswith('corral_peer_received_total{result="applied"} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main():
    a_port, count = int(sys.argv[1]), int(sys.argv[2])
    peer_urls = [u for u in sys.argv[3].split(",") if u]
    peer_admins = [int(p) for p in sys.argv[4].split(",") if p]
    conn = http.client.HTTPConnection("127.0.0.1", a_port, timeout=10)

    def purge(path, wait):
        target = path + ("?wait=peers" if wait else "")
        t = time.perf_counter()
        conn.request("PURGE", target, headers={"Host": HOST})
        resp = conn.getresponse()
        body = resp.read()
        took = (time.perf_counter() - t) * 1000.0
        if resp.status != 200:
            fail(f"PURGE {target}: {resp.status} {body[:200]!r}")
        if wait:
            try:
                results = json.loads(body)["peers"]
            except (ValueError, KeyError, TypeError):
                fail(f"PURGE {target}: no peers in the answer: {body[:300]!r}")
            # A itself, if listed at all, is not a peer it waits for
            results.pop(f"http://127.0.0.1:{a_port}", None)
            if sorted(results) != sorted(peer_urls):
                fail(f"PURGE {target}: peers {sorted(results)}, expected {sorted(peer_urls)}")
            bad = {u: r for u, r in results.items() if r != "delivered"}
            if bad:
                fail(f"PURGE {target}: not delivered: {bad}")
        return took

    sent = 0
    for i in range(WARMUP):  # connections to the peers opened, code paths warm
        purge(f"/bench/warmup/{i}", True)
        sent += 1
    waited = sorted(purge(f"/bench/wait/{i}", True) for i in range(count))
    sent += count
    plain = sorted(purge(f"/bench/plain/{i}", False) for i in range(count))
    sent += count
    conn.close()

    # the plain ones are delivered asynchronously: give them a moment, then every peer must
    # have applied every message A sent, once
    deadline = time.time() + 10
    counts = [applied(p) for p in peer_admins]
    while any(n < sent for n in counts) and time.time() < deadline:
        time.sleep(0.05)
        counts = [applied(p) for p in peer_admins]
    wrong = {u: n for u, n in zip(peer_urls, counts) if n != sent}
    if wrong:
        fail(f"peers' corral_peer_received_total{{result=\"applied\"}} != {sent}: {wrong}")

    n = len(peer_urls)
    w50, w99 = percentile(waited, 0.50), percentile(waited, 0.99)
    p50, p99 = percentile(plain, 0.50), percentile(plain, 0.99)
    print(f"peers={n} PURGE ?wait=peers (A's accept -> every peer applied): "
          f"p50 {w50:.3f} ms  p99 {w99:.3f} ms  max {waited[-1]:.3f} ms")
    print(f"peers={n} PURGE, no wait (A's own answer):                      "
          f"p50 {p50:.3f} ms  p99 {p99:.3f} ms  max {plain[-1]:.3f} ms")
    print(f"peers={n} ratio wait / no wait: p50 {w50 / p50:.2f}x  p99 {w99 / p99:.2f}x")
    print(f"peers={n} every peer applied {sent} messages")


if __name__ == "__main__":
    main()
