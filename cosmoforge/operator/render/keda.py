"""keda mode: a KEDA ScaledObject scales the run on its JetStream consumer's lag.

Only rendered when `generation.autoscaling.mode` is `keda`; otherwise the operator's own timer
(`operator.autoscale`) sets the replicas.
"""

from __future__ import annotations

from cosmoforge import queue
from cosmoforge.operator.render.common import (
    Manifest,
    Platform,
    child_metadata,
    child_name,
    deploys_server,
    run_key,
)
from cosmoforge.spec.model import GenerationRun


def scaled_object(run: GenerationRun, platform: Platform) -> Manifest | None:
    """keda mode: KEDA scales the server (or, with an endpoint, the generators) on consumer lag."""
    generation = run.spec.generation
    if generation.autoscaling.mode != "keda":
        return None
    server = deploys_server(run)
    target = child_name(run.name, "inference" if server else "generator")
    low, high = (generation.replicas.min, generation.replicas.max) if server else (0, generation.workers)
    window = generation.autoscaling.stabilization_seconds
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": child_metadata(run, "autoscaler", "scaler", platform),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicaCount": low,
            "maxReplicaCount": high,
            "pollingInterval": 15,
            "cooldownPeriod": max(30, window),
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": window}}
                }
            },
            "triggers": [
                {
                    "type": "nats-jetstream",
                    "metadata": {
                        "natsServerMonitoringEndpoint": platform.nats_monitoring,
                        "account": "$G",
                        "stream": queue.stream_name(run_key(run)),
                        "consumer": queue.CONSUMER,
                        "lagThreshold": str(generation.autoscaling.target_queue_per_replica),
                        "activationLagThreshold": "0",
                    },
                }
            ],
        },
    }
