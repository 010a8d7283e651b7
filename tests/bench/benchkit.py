"""What the benchmark scripts share: their tables, as padded markdown that reads in a terminal too, and the
best-of-N timer."""
import time


def table(header, rows) -> str:
    widths = [max(len(str(row[i])) for row in list(rows) + [header]) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(str(v).ljust(w) for v, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def best_of(repeat: int, work) -> float:
    """The fastest of `repeat` runs of work(), in seconds (the least disturbed by the rest of the machine)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)
