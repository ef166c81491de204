"""The client's side of Azure ML: the only package that imports ``azure.*``.

- :mod:`.ops`: every SDK call, in a worker thread, with typed errors.
- :mod:`.jobs`: the cluster's AML jobs as Dask ``ProcessInterface`` objects;
  :mod:`.jobwait` waits for a job's tag and explains failures.
- :mod:`.jobspec`: the command jobs, built without a network.
- :mod:`.environment`: the node environment; :mod:`.versions`: version checks;
  :mod:`.workspace`: finding the workspace; :mod:`.sdknotices`: no SDK notices or secrets in logs.
"""
