"""The Kubernetes operator for `GenerationRun`: render children, scale inference, roll status up.

Rendering (`render`) and scaling decisions (`autoscale`, `stages`) are pure functions tested
without a cluster; `handlers` holds the kopf handlers that do the I/O. The package is
`cosmoforge.operator`, never a top-level `operator` (that would shadow the standard library).
"""
