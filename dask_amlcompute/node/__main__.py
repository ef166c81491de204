"""``python -m dask_amlcompute.node``: the command every node of a cluster job runs."""

import sys

from .entry import main

sys.exit(main())
