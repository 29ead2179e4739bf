"""Purge propagation through the message broker, driven by benches/bus_propagation.sh.

    python3 benches/bus_propagation.py A_PORT C_ADMIN_PORT COUNT

Over one keep-alive connection to corral A: COUNT sequential PURGEs (each answered once the
broker confirmed it). After each answer, C's admin /metrics is polled (one keep-alive
connection) until its corral_bus_applied_total has counted that purge: the time from A's
answer to C having applied it (an upper bound: it includes the poll's own round trip).
Also the PURGE's own round trip at A (accept, publish, the broker's confirm, answer).
Prints p50 / p99 in ms; exits 1 if an answer is not 200 or C does not apply a purge in 5 s.
"""

import http.client
import math
import sys
import time

HOST = "bench.test"


def fail(msg):
    print(f"bus_propagation.py: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def percentile(sorted_ms, q):
    return sorted_ms[max(0, math.ceil(q * len(sorted_ms)) - 1)]


def main():
    a_port, c_admin, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    a = http.client.HTTPConnection("127.0.0.1", a_port, timeout=10)
    c = http.client.HTTPConnection("127.0.0.1", c_admin, timeout=10)

    def applied():
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        for line in text.splitlines():
            if line.startswith("corral_bus_applied_total "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    base = applied()
    times = []
    answers = []
    for i in range(count):
        sent = time.perf_counter()
        a.request("PURGE", f"/bench/bus/{i}", headers={"Host": HOST})
        resp = a.getresponse()
        body = resp.read()
        answered = time.perf_counter()
        answers.append((answered - sent) * 1000.0)
        if resp.status != 200:
            fail(f"PURGE {i}: {resp.status} {body[:200]!r}")
        while applied() < base + i + 1:
            if time.perf_counter() - answered > 5:
                fail(f"C did not apply purge {i} within 5 s")
        times.append((time.perf_counter() - answered) * 1000.0)
    times.sort()
    answers.sort()
    print(f"bus: PURGE at A, accept -> answer (the broker's confirm): p50 {percentile(answers, 0.5):.3f} ms  "
          f"p99 {percentile(answers, 0.99):.3f} ms")
    print(f"bus: A's answer -> C applied: p50 {percentile(times, 0.5):.3f} ms  "
          f"p99 {percentile(times, 0.99):.3f} ms  max {times[-1]:.3f} ms  ({count} purges)")


if __name__ == "__main__":
    main()
