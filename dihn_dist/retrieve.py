"""python -m dihn_dist.retrieve RUN_DIR --query INDEX|IMAGE_PATH [--stage incremental] [--topk 10] [--data DIR]

The command line of `dihn_dist.serving.retrieve`, which documents it in full.
"""
import sys

from .serving.retrieve import main

if __name__ == "__main__":
    sys.exit(main())
