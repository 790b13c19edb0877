"""Summarises the order path from a gateway's /metrics text on stdin."""
import sys

m = {}
for line in sys.stdin:
    if line.startswith("cardgate_"):
        name, _, value = line.rstrip().rpartition(" ")
        m[name] = float(value)


def avg(base):
    n = m.get(base + "_count", 0)
    return m.get(base + "_sum", 0) / n if n else 0.0


commits = m.get("cardgate_ledger_batch_size_count", 0)
print(
    f"ledger: {commits:.0f} commits of {avg('cardgate_ledger_batch_size'):.1f} orders, "
    f"{avg('cardgate_ledger_commit_seconds') * 1000:.2f} ms each; "
    f"reservation round trip {avg('cardgate_reservation_seconds') * 1000:.2f} ms"
)
