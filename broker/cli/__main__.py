"""`python -m broker.cli`: the same as the `brokerctl` console script."""

import sys

from broker.cli.brokerctl import main

sys.exit(main())
