"""``python -m lifecycle``: the CLI (see ``lifecycle.cli``)."""

from lifecycle.cli import main

raise SystemExit(main())
