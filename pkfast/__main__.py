"""python -m pkfast: the command line (see pkfast.cli)."""

from pkfast.cli import main

raise SystemExit(main())
