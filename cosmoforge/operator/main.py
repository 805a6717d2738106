"""The operator process's start-up: read the settings from the environment, register handlers.

Importing this module is starting the operator (kopf's `-m` convention): `cosmo operator`
imports it just before `kopf.run`, and `kopf run -m cosmoforge.operator.main` works the same.
Everything else imports `handlers` and builds `OperatorSettings` itself, with no environment.
"""

from __future__ import annotations

import kopf

from cosmoforge.operator.handlers import registry
from cosmoforge.operator.settings import OperatorSettings

registry(OperatorSettings.from_env(), into=kopf.get_default_registry())
