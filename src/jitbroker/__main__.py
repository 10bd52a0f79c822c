"""``python -m jitbroker``: the ``jitbroker`` command."""

from .cli import main

raise SystemExit(main())
