"""`python -m service` is the `authsvc` command."""

import sys

from service.cli import main

sys.exit(main())
