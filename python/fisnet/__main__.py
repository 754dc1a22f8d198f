"""``python -m fisnet ...`` — the same as the ``fisnet`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
