"""python -m service serve | translate | info — see ``python -m service --help``."""

from service.cli import main

raise SystemExit(main())
