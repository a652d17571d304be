"""Writing run files atomically: results.json and metrics.csv."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .atomic import write_text_atomic


def write_json_atomic(obj, path: Path) -> None:
    write_text_atomic(json.dumps(obj, indent=2) + "\n", path)


def write_metrics_csv(history: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(buffer.getvalue(), path)
