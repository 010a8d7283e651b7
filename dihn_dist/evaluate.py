"""python -m dihn_dist.evaluate RUN_DIR [--topk K] [--precision-k K] [--out DIR]

The command line of `dihn_dist.reports.evaluate`, which documents it in full.
"""
import sys

from .reports.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
