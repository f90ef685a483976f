"""`python -m broker serve ...`."""

import sys

from broker.cli_serve import main

sys.exit(main())
