"""``python -m memofill``: the same command line as the ``memofill`` script."""

from memofill.cli import main

raise SystemExit(main())
