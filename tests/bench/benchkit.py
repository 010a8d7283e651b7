"""What the benchmark scripts share: their tables, as padded markdown that reads in a terminal too."""


def table(header, rows) -> str:
    widths = [max(len(str(row[i])) for row in list(rows) + [header]) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(str(v).ljust(w) for v, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])
