"""`python -m cosmoforge.cli`: the `cosmo` command without its console script (child processes)."""

import sys

from cosmoforge.cli.main import main

sys.exit(main())
