"""The command line and output of a benchmark measured row by row (``planner_accuracy.py``,
``planner_fits.py``): ``--only`` some row indices, ``--out`` the path stem, ``--merge`` earlier
partial runs; the JSON is rewritten after every row, so a cut-short run keeps what finished."""

from __future__ import annotations

import argparse
import json
import pathlib


def main(description: str, default_out: str, count: int, measure, table, device: str, progress=None) -> None:
    """Run ``measure(i)`` for the chosen rows (or merge earlier JSON files), write ``<out>.json``
    and ``<out>.md`` (``table(rows)``); ``progress(row)`` is a line printed after each row."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--only", type=int, nargs="*", help="indices of rows to run")
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--merge", nargs="*", help="JSON files of earlier (partial) runs to combine into --out")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows):
        out.with_suffix(".json").write_text(json.dumps({"device": device, "rows": rows}, indent=1, default=str))

    if args.merge:
        merged = {r["index"]: r for f in args.merge for r in json.loads(pathlib.Path(f).read_text())["rows"]}
        rows = [merged[i] for i in sorted(merged)]
    else:
        rows = []
        for i in args.only or range(count):
            rows.append(measure(i))
            if progress is not None:
                print(progress(rows[-1]), flush=True)
            save(rows)
    save(rows)
    text = table(rows)
    print(text)
    out.with_suffix(".md").write_text(text + "\n")
