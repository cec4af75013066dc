"""python -m export train | evaluate | export | verify — see ``python -m export --help``."""

from export.cli import main

raise SystemExit(main())
