"""python -m dihn_dist.export RUN_DIR --faiss FILE [--stage incremental|original|retrain] [--index flat|ivf|hnsw]

The command line of `dihn_dist.serving.export`, which documents it in full.
"""
import sys

from .serving.export import main

if __name__ == "__main__":
    sys.exit(main())
