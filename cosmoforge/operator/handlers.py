"""The kopf handlers for GenerationRun, one per cause, registered with the operator's settings.

`registry(settings)` builds a kopf registry holding every handler; `cosmo operator` builds it
from the environment at start-up (`operator.main`), tests from settings they choose. Creation,
resumption, spec changes and the timer all run the same level-based `reconcile`; deletion
cancels the run at the dispatcher, deletes its stream and its children, and never touches the
data in object storage. The finalizer holds the object until that is done, so a run created
again under the same name meets no predecessor still queuing under its key.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import kopf

from cosmoforge.operator.children import delete_all
from cosmoforge.operator.dispatch import QueueProbe, cancel_run
from cosmoforge.operator.kube import Kube
from cosmoforge.operator.progress import condition
from cosmoforge.operator.reconcile import CONFLICT, error_code, namespace_of, reconcile
from cosmoforge.operator.render import Platform
from cosmoforge.operator.settings import OperatorSettings
from cosmoforge.queue import run_key
from cosmoforge.spec.crd import PLURAL
from cosmoforge.spec.model import API_GROUP, API_VERSION

Logger = logging.Logger | logging.LoggerAdapter[Any]
FINALIZER = f"{API_GROUP}/finalizer"
# Deletion waits this many tries for an unreachable dispatcher or NATS, then lets the object go:
# a run that could not be cancelled shows up as a SpecConflict if its name is used again.
DELETE_RETRIES = 5
DELETE_RETRY_SECONDS = 5.0

_connection: dict[str, kopf.ConnectionInfo] = {}


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's own login, remembered so the children client uses the same credentials."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        _connection["info"] = info
    return info


async def configure(
    config: OperatorSettings, settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any
) -> None:
    """kopf's settings and the clients every handler shares (in `memo`)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    # The chart installs the CRD, and one replica runs: no cluster-wide discovery, no peering.
    settings.scanning.disabled = True
    settings.peering.standalone = True
    settings.posting.enabled = config.post_events
    memo.platform = config.platform
    memo.queue = QueueProbe(config.platform.nats_url)
    memo.kube = Kube(lambda: _connection.get("info"))


async def close(memo: kopf.Memo, **_: Any) -> None:
    await memo.queue.close()
    await memo.kube.close()


async def apply_run(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    """A run created, changed or found at start-up: converge it now."""
    await reconcile(body, patch, memo, logger)


async def follow_run(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    """Autoscaling, status roll-up and the next stage, every `interval` seconds."""
    await reconcile(body, patch, memo, logger)


async def remove_run(body: kopf.Body, memo: kopf.Memo, logger: Logger, retry: int = 0, **_: Any) -> None:
    """Stop the work: cancel the run at the dispatcher, delete its stream and every child.
    Prompts, shards and datasets in storage stay."""
    key = run_key(namespace_of(body), body.metadata.name)
    registered = condition(list((body.get("status") or {}).get("conditions") or []), "Registered")
    # A run that failed on a conflict never owned the key: what runs under it is another's.
    owned = registered is None or registered.get("reason") != CONFLICT
    try:
        if owned:
            await stop_queuing(key, memo.platform, memo.queue, logger)
    except Exception as error:
        if retry + 1 < DELETE_RETRIES:
            message = f"cannot cancel {key} yet: {error!r}"
            raise kopf.TemporaryError(message, delay=DELETE_RETRY_SECONDS) from error
        logger.warning(f"{key} may still be queued: {error!r}; deleting the GenerationRun anyway")
    removed = await delete_all(memo.kube, body, namespace_of(body))
    logger.info(f"removed {removed} children of {key}; its data stays in storage")


async def stop_queuing(key: str, platform: Platform, probe: QueueProbe, logger: Logger) -> None:
    """Cancel at the dispatcher (nothing to do for a run it does not know or that is over),
    then delete the stream: a finished run's empty stream has no use either."""
    if platform.dispatcher:
        try:
            await cancel_run(platform.dispatcher, key)
            logger.info(f"cancelled {key} at the dispatcher")
        except Exception as error:
            if error_code(error) not in ("NOT_FOUND", "FAILED_PRECONDITION"):
                raise
    if await probe.remove(key):
        logger.info(f"deleted the stream of {key}")


def registry(settings: OperatorSettings, into: kopf.OperatorRegistry | None = None) -> kopf.OperatorRegistry:
    """Every handler in `into` (a new registry by default), bound to `settings`."""
    reg = into if into is not None else kopf.OperatorRegistry()
    resource = (API_GROUP, API_VERSION, PLURAL)
    kopf.on.login(registry=reg)(login)
    # A partial keeps the handler's id ("configure"), which kopf persists; the settings ride along.
    kopf.on.startup(registry=reg)(functools.partial(configure, settings))
    kopf.on.cleanup(registry=reg)(close)
    kopf.on.resume(*resource, registry=reg)(apply_run)
    kopf.on.create(*resource, registry=reg)(apply_run)
    kopf.on.update(*resource, field="spec", registry=reg)(apply_run)
    interval = settings.interval
    kopf.timer(*resource, interval=interval, initial_delay=interval, registry=reg)(follow_run)
    kopf.on.delete(*resource, registry=reg)(remove_run)
    return reg
