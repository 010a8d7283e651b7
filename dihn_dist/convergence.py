"""python -m dihn_dist.convergence RUN_DIR: when a stage stopped improving, at what mAP, after how much training.

The command line of `dihn_dist.reports.convergence`, which documents it in full.
"""
import sys

from .reports.convergence import main

if __name__ == "__main__":
    sys.exit(main())
