"""CPU seconds of processes, from /proc: the load scripts' CPU per request by process."""
import os

HZ = os.sysconf("SC_CLK_TCK")


def secs(pid):
    """User and system CPU seconds of process `pid` so far (0 if it is gone)."""
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / HZ
    except (OSError, IndexError, ValueError):
        return 0.0


def comm(pid):
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


def postgres_secs():
    """CPU seconds of every Postgres process together (backends, WAL writer, checkpointer)."""
    return sum(secs(p) for p in os.listdir("/proc") if p.isdigit() and comm(p) == "postgres")


if __name__ == "__main__":
    import sys

    print(" ".join(str(secs(p)) for p in sys.argv[1:]))
