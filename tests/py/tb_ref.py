"""TensorBoard's own reader on the event files `unlearn run` writes, for the Rust tests.

  scalars --logdir DIR --out OUT.json
          every scalar series as TensorBoard's EventAccumulator loads it (purging points an earlier
          session wrote at or after a restart's step, as TensorBoard does):
          {"files": [event file names], "tags": {tag: [[step, value], ...]}}
"""
import argparse
import json
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def cmd_scalars(a):
    files = sorted(f for f in os.listdir(a.logdir) if "tfevents" in f)
    acc = EventAccumulator(a.logdir, size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    tags = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    with open(a.out, "w") as f:
        json.dump({"files": files, "tags": tags}, f)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scalars")
    s.add_argument("--logdir", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(f=cmd_scalars)
    a = ap.parse_args()
    a.f(a)


if __name__ == "__main__":
    main()
