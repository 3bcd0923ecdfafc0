#!/usr/bin/env python3
"""The measurements behind cr_queue's tuning constants (docs/performance.md).

    python bench/tune.py            # about 5 minutes on 2 cores
    python bench/tune.py --quick    # smaller data, fewer repetitions

Each variant runs in turn with the others, several times, against one
throwaway cluster; the medians are printed.  What is varied:

* store/upload.py CHUNK_SIZE / BATCH_BYTES / PIPELINE_DEPTH: upload of one large
  tomodir (depth 0 = COPY in the packing thread, no pipelining);
* store/read.py READ_BATCH: chunks per statement when fetching that archive;
* parallel_registration.ADD_THREADS and retrieve.RETRIEVE_THREADS: crh_add and crh_retrieve
  (in-process) of a tree of 1 MB tomodirs.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402
import crqbench  # noqa: E402
import psycopg  # noqa: E402

from cr_queue import add, parallel_registration, retrieve
from cr_queue import store  # noqa: E402
from cr_queue.store import read, upload  # noqa: E402
from cr_queue.tomodir import archive, synth  # noqa: E402
from cr_queue.db.connection import Database  # noqa: E402


class Null:
    def write(self, data) -> int:
        return len(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps = 2 if args.quick else 3
    big_bytes = 60_000_000 if args.quick else 300_000_000
    tree_bytes = 20_000_000 if args.quick else 100_000_000
    work = bl.scratch("crq-tune-")
    try:
        with bl.BenchCluster(work) as cluster:
            big = crqbench.big_tomodir(work / "big", big_bytes)
            print(f"# upload of one {bl.mb(bl.tree_bytes(big))} tomodir: seconds, median of {reps}")
            variants = [
                (chunk, batch, depth)
                for chunk, batch, depth in itertools.product((256 << 10, 1 << 20, 4 << 20), (1 << 20, 4 << 20, 16 << 20), (0, 2, 4))
                if batch >= chunk
            ]
            times: dict[tuple, list[float]] = {v: [] for v in variants}
            url = cluster.new_database()
            for _ in range(reps):
                for chunk, batch, depth in variants:
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute("TRUNCATE blobs CASCADE")
                        upload.BATCH_BYTES, upload.PIPELINE_DEPTH = batch, depth
                        times[(chunk, batch, depth)].append(
                            bl.timed(lambda: store.put_tree(conn, store.DATABASE, big, chunk_size=chunk))
                        )
            for (chunk, batch, depth), ts in sorted(times.items(), key=lambda kv: bl.median(kv[1])):
                print(f"chunk {chunk >> 10:5d} KiB  batch {batch >> 20:3d} MiB  depth {depth}  {bl.median(ts):6.2f} s")
            upload.BATCH_BYTES, upload.PIPELINE_DEPTH = 4 << 20, 2

            print(f"# fetch of that archive (1 MiB chunks): seconds, median of {reps}")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("TRUNCATE blobs CASCADE")
                sha = store.put_tree(conn, store.DATABASE, big).sha256
                reads = {n: [] for n in (1, 4, 8, 32)}
                for _ in range(reps):
                    for n in reads:
                        read.READ_BATCH = n
                        reads[n].append(bl.timed(lambda: store.fetch(conn, store.DATABASE, sha, Null())))
            for n, ts in reads.items():
                print(f"read batch {n:3d}  {bl.median(ts):6.2f} s")
            read.READ_BATCH = 8
            cluster.drop_database(url)

            tree = work / "tree"
            synth.make_tree_of_size(tree, tree_bytes)
            n_tomodirs = len(list(tree.glob("site_*/td_*")))
            print(f"# crh_add / crh_retrieve in-process, {n_tomodirs} tomodirs of 1 MB: seconds, median of {reps}")
            adds = {n: [] for n in (1, 2, 3)}
            rets = {n: [] for n in (1, 2, 3)}
            for _ in range(reps):
                for n in adds:
                    url = cluster.new_database()
                    db = Database(url=url, source="tune", embedded=False, store=store.DATABASE)
                    copy = work / "copy"
                    bl.rmtree(copy)
                    bl.sh(f"cp -a {tree} {copy}")
                    parallel_registration.ADD_THREADS = n
                    adds[n].append(bl.timed(lambda: add.add(db, [copy], add.AddOptions())))
                    ctx = crqbench.Context(argparse.Namespace(smoke=True), crqbench.SMOKE, work, cluster)
                    crqbench.make_results(ctx, url, None, copy)
                    retrieve.RETRIEVE_THREADS = n
                    rets[n].append(bl.timed(lambda: retrieve.retrieve(db, [copy], limits=archive.Limits())))
                    bl.rmtree(copy)
                    cluster.drop_database(url)
            for n in adds:
                print(f"threads {n}  crh_add {bl.median(adds[n]):6.2f} s  crh_retrieve {bl.median(rets[n]):6.2f} s")
    finally:
        bl.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
