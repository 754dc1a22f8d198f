"""Training-step time against the number of classes — a thin wrapper around
``fisnet.bench_scaling`` (also ``fisnet bench``); see that module for what is measured.

    python bench/scaling.py --quick          # CPU-sized subset
    python bench/scaling.py                  # K = 2, 10, 100, 1000 (GPU recommended)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from fisnet.bench_scaling import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
