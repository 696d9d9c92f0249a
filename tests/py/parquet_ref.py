"""Writes benchmark JSON files as Parquet with pyarrow, the way the Hugging Face hub publishes them,
for tests/parquet.rs.

  write --jobs JOBS.json    JOBS = [{"json": IN, "out": OUT.parquet, "compression": snappy|zstd|none}, ...]:
                            the records of each IN (a JSON array, one array per line, or JSON lines) as rows
                            in several row groups; string records (MUSE raw/privleak text) become a `text`
                            column, as in the hub's MUSE files.
"""
import argparse
import json

import pyarrow as pa
import pyarrow.parquet as pq

from hf_ref import read_records


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--jobs", required=True)
    a = ap.parse_args()
    with open(a.jobs) as f:
        jobs = json.load(f)
    for job in jobs:
        recs = [r if isinstance(r, dict) else {"text": r} for r in read_records(job["json"])]
        table = pa.Table.from_pylist(recs)
        pq.write_table(table, job["out"], compression=job["compression"], row_group_size=max(1, len(recs) // 3))
        print(json.dumps({"out": job["out"], "rows": table.num_rows, "columns": table.column_names}))


if __name__ == "__main__":
    main()
