"""python -m service serve | translate | info — see ``python -m service --help``."""

import sys

if sys.argv[1:2] == ["health"]:  # a container HEALTHCHECK: gRPC only, not the whole server
    from service.healthcheck import main as health

    raise SystemExit(health(sys.argv[2:]))

from service.cli import main

raise SystemExit(main())
