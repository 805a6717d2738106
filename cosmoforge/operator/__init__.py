"""The Kubernetes operator for `GenerationRun`: render children, scale inference, roll status up.

Pure cores, tested without a cluster: `render` (spec -> manifests), `autoscale` (replicas from
queue depth) and `progress` (phase and the next stage). The I/O shell: `handlers` (the kopf
handlers, registered with `settings` at start-up by `main`), `reconcile` (one observe, decide,
act pass), `advance` (stage Jobs), `children` (apply, scale, delete) and the clients in `kube`
and `dispatch`. The package is `cosmoforge.operator`, never a top-level `operator` (that would
shadow the standard library).
"""
