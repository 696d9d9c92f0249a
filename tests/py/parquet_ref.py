"""Writes benchmark JSON files as Parquet with pyarrow, the way the Hugging Face hub publishes them,
for tests/parquet.rs.

  write --json IN --out OUT.parquet --compression snappy|zstd|none
        the records of IN (a JSON array, one array per line, or JSON lines) as rows; string records
        (MUSE raw/privleak text) become a `text` column, as in the hub's MUSE files.
"""
import argparse
import json

import pyarrow as pa
import pyarrow.parquet as pq


def read_records(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        v = json.loads(text)
        return v if isinstance(v, list) else [v]
    except json.JSONDecodeError:
        out = []
        for line in text.splitlines():
            if line.strip():
                x = json.loads(line)
                out.extend(x if isinstance(x, list) else [x])
        return out


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--json", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--compression", default="snappy", choices=["snappy", "zstd", "none"])
    a = ap.parse_args()
    recs = [r if isinstance(r, dict) else {"text": r} for r in read_records(a.json)]
    table = pa.Table.from_pylist(recs)
    pq.write_table(table, a.out, compression=a.compression, row_group_size=max(1, len(recs) // 3))
    print(json.dumps({"rows": table.num_rows, "columns": table.column_names}))


if __name__ == "__main__":
    main()
