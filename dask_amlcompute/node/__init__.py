"""What runs inside an AML job, on every node.

It uses the standard library, distributed and :mod:`dask_amlcompute._protocol`
only (no azure, asyncssh or mlflow needed).

``python -m dask_amlcompute.node`` (:mod:`.entry`) runs a cluster's or worker
job's node; ``python -m dask_amlcompute.node.script`` runs a job-mode node
(scheduler, workers, then the user's script). :mod:`.plugins` are the
scheduler plugins.
"""
