"""``python -m lifecycle``: the CLI (see ``lifecycle._cli``)."""

import sys

try:
    from lifecycle._cli import main
except KeyboardInterrupt:  # Ctrl-C before main() could catch it: one line, no traceback
    sys.stderr.write("dit-lifecycle: interrupted\n")
    raise SystemExit(130) from None

raise SystemExit(main())
