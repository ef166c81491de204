"""Local emulator of the slice of the Azure ML workspace API that dask-amlcompute uses."""
