"""Result files of a batch run: one file per finished mini-batch, written atomically.

``batch-NNNNNN.json`` (plain data), ``.parquet`` (pandas DataFrames, with the
batch's errors in ``.errors.json``) or ``.pkl`` (anything picklable); see the
``output_dir`` and ``output_format`` options of
:func:`~dask_amlcompute.batch.iter_batches`.
"""

from __future__ import annotations

import json
import os
import pickle
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
    errors = [r.to_dict() for _, r in pairs if isinstance(r, ItemError)]
    ok = [(i, r) for i, r in pairs if not isinstance(r, ItemError)]
    if fmt == "auto":
        fmt = "json"
        if ok and type(ok[0][1]).__name__ == "DataFrame":
            try:
                import pandas as pd
                import pyarrow  # noqa: F401

                if all(isinstance(r, pd.DataFrame) for _, r in ok):
                    fmt = "parquet"
            except ImportError:
                pass
    path = stem.with_suffix("." + {"pickle": "pkl"}.get(fmt, fmt))
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "parquet":
        import pandas as pd

        frames = [r.assign(_item=i) for i, r in ok]
        (pd.concat(frames) if frames else pd.DataFrame()).to_parquet(tmp)
        if errors:
            stem.with_suffix(".errors.json").write_text(json.dumps(errors, indent=1))
    elif fmt == "pickle":
        with open(tmp, "wb") as fh:
            data = {"batch": batch.number, "indices": batch.indices, "results": batch.results}
            pickle.dump(data, fh)
    else:  # json (iter_batches checked output_format)
        items = [{"index": i, "result": r} for i, r in ok] + [{"error": e} for e in errors]
        items.sort(key=lambda d: d.get("index", d.get("error", {}).get("index", -1)))
        tmp.write_text(json.dumps({"batch": batch.number, "items": items}, default=_json_default))
    os.replace(tmp, path)
    return path
