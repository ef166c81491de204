"""Dask clusters on Azure Machine Learning compute clusters (AmlCompute)."""

__version__ = "0.1.0"
