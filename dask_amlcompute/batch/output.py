"""Result files of a batch run (``output_dir``): one per finished batch, written atomically.

``.json`` (plain data), ``.parquet`` (DataFrames; errors in ``.errors.json``) or ``.pkl``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

from .types import BatchResult, ItemError


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(
        f"a result of type {type(value).__name__} cannot be written as JSON; return plain "
        "data (dict/list/str/number), DataFrames (parquet), or use output_format='pickle'"
    )


def _write_batch(out_dir: Path, batch: BatchResult, fmt: str) -> Path:
    """Write one finished batch under ``out_dir`` atomically; returns the file."""
    stem = out_dir / f"batch-{batch.number:06d}"
    pairs = list(zip(batch.indices, batch.results, strict=True))
    ok = [(i, r) for i, r in pairs if not isinstance(r, ItemError)]
    if fmt == "auto":  # results that are DataFrames come with pandas imported
        pandas = sys.modules.get("pandas")
        tables = pandas and ok and all(isinstance(r, pandas.DataFrame) for _, r in ok)
        fmt = "parquet" if tables and importlib.util.find_spec("pyarrow") else "json"
    path = stem.with_suffix("." + {"pickle": "pkl"}.get(fmt, fmt))
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "parquet":
        import pandas as pd

        frames = [r.assign(_item=i) for i, r in ok]
        (pd.concat(frames) if frames else pd.DataFrame()).to_parquet(tmp)
        if errors := [r.to_dict() for _, r in pairs if isinstance(r, ItemError)]:
            stem.with_suffix(".errors.json").write_text(json.dumps(errors, indent=1))
    elif fmt == "pickle":
        data = {"batch": batch.number, "indices": batch.indices, "results": batch.results}
        tmp.write_bytes(pickle.dumps(data))
    else:  # json, in input order
        items = [{"error": r.to_dict()} if isinstance(r, ItemError) else {"index": i, "result": r}
                 for i, r in pairs]  # fmt: skip
        tmp.write_text(json.dumps({"batch": batch.number, "items": items}, default=_json_default))
    os.replace(tmp, path)
    return path
