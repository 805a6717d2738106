"""`python -m cosmoforge.services.modelserver`: the same server as `cosmo serve-model`."""

from cosmoforge.services.modelserver.serve import main

raise SystemExit(main())
