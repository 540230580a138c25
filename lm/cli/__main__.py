"""`python -m lm.cli ...`, what the `lm` console script runs (pod processes, sweep trials
and the host-malloc re-exec start commands this way)."""

import sys

from lm.cli import main

sys.exit(main())
