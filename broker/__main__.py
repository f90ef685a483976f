"""`python -m broker serve ...`."""

import sys

from broker.cli.serve import main

sys.exit(main())
