"""python -m dihn_dist.prepare --dataset NAME --out DATA [options]: turn a dataset on disk into FFCV files plus
a manifest that fixes the DIHN retrieval protocol.

The command line of `dihn_dist.data.prepare`, which documents what is written and how.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .common.errors import debug_requested, run_command
from .data.parts import DEFAULT_MAX_SIDE, MIN_STORED_SIDE
from .data.prepare import prepare
from .data.sources import DATASETS

# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dihn_dist.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", type=Path, help="source folder (fashion-mnist: optional, default "
                        "/usr/share/datasets/fashion-mnist; image-list: folder the listed paths are relative to, "
                        "default each list's own folder)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: new, empty, or a preparation "
                        "(never a run folder or another non-empty folder)")
    parser.add_argument("--extends", type=Path, metavar="OLD_DATA",
                        help="a new round: --out begins with OLD_DATA's database, bit-identical, then this round's "
                             "items (image-list: the items of --database-list; fashion-mnist, cifar-10: the classes "
                             "that --classes adds); options not given are OLD_DATA's")
    parser.add_argument("--classes", type=int, metavar="K", help="fashion-mnist, cifar-10: keep classes 0..K-1 "
                        "only (the class-rounds protocol); with --extends, K must exceed the classes OLD_DATA has")
    parser.add_argument("--num-seen", type=int, help="number of original classes (0..K-1); default: 7 for "
                        "fashion-mnist and cifar-10 (--classes K: K, every item original), 18 for nus-wide-tc21; "
                        "required for image-list; with --extends: OLD_DATA's classes")
    parser.add_argument("--resolution", type=int, help="raw datasets (fashion-mnist, cifar-10): stored side in "
                        f"pixels, at least {MIN_STORED_SIDE} (default: native, 28 / 32)")
    parser.add_argument("--max-side", type=int, help=f"JPEG datasets (nus-wide-tc21, image-list): longest stored "
                        f"side in pixels, at least {MIN_STORED_SIDE} (default {DEFAULT_MAX_SIDE})")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="writer processes (default: the CPUs this process may use)")
    parser.add_argument("--skip-bad", action="store_true",
                        help=f"skip bad images (unreadable, or a stored side under {MIN_STORED_SIDE} px; listed in "
                             f"the manifest) instead of failing")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if --out is complete; replace a preparation made with other options")
    parser.add_argument("--database-per-class", type=int,
                        help="keep only the first K database items of each class (by first label); default all")
    parser.add_argument("--query-per-class", type=int,
                        help="keep only the first K query items of each class (by first label); default all")
    parser.add_argument("--database-list", type=Path, help="image-list: database list file")
    parser.add_argument("--query-list", type=Path, help="image-list: query list file")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: exit 0, or one line on stderr and exit 2 (bad input) / 1 (a failure while writing)."""
    args = parse_args(argv)

    def body() -> int:
        prepare(args)
        return 0

    return run_command(body, debug=args.debug or debug_requested(argv))


if __name__ == "__main__":
    sys.exit(main())
