"""The order path's own figures from a gateway's /metrics text on stdin, as one JSON line."""
import json
import sys

m = {}
for line in sys.stdin:
    if line.startswith("cardgate_"):
        name, _, value = line.rstrip().rpartition(" ")
        m[name] = float(value)


def avg(base):
    n = m.get(base + "_count", 0)
    return m.get(base + "_sum", 0) / n if n else 0.0


print(json.dumps({
    "scenario": "gateway-metrics-check",
    "ledger_commits": m.get("cardgate_ledger_batch_size_count", 0),
    "orders_per_commit": round(avg("cardgate_ledger_batch_size"), 1),
    "commit_ms": round(avg("cardgate_ledger_commit_seconds") * 1000, 2),
    "reservation_ms": round(avg("cardgate_reservation_seconds") * 1000, 2),
}))
