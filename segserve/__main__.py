"""``python -m segserve`` is the same as the ``segserve`` command."""

from segserve.cli import main

raise SystemExit(main())
