"""``python -m bench``: run every scenario against a private redis-server and write the report."""

import sys

from bench.run import main

if __name__ == "__main__":  # spawned worker processes import this module too
    sys.exit(main())
