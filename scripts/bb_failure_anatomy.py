#!/usr/bin/env python3
"""Why the Backblaze FDR target (>= 0.55 at FAR <= 1 %) looks out of reach: the failures
of a period split by what the critical SMART counters (5/187/188/197/198) showed in the
10 days before the failure, next to what the same signals cost in healthy drives.

usage: bb_failure_anatomy.py [DATA.parquet] [--from 2018-05-01] [--to 2018-06-30]
Needs: pip install polars

Definitions are the protocol's (../shared/specs/backblaze-protocol.md): a failed drive has
failure = 1 on day f inside the period; its window is [f-10, f-1]; a healthy drive is one
seen in the period that did not fail in it. A counter "rose" on a snapshot when it is
higher than on the drive's previous snapshot (a missing value carries the previous
reading forward, never counted as zero). Snapshots before the period are read for the
"previous snapshot" only.
"""
import argparse
import datetime as dt
import math

import polars as pl

CRIT = [5, 187, 188, 197, 198]
H = 10


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default="../shared/data/backblaze/st4000dm000_2018H1.parquet")
    ap.add_argument("--from", dest="d0", default="2018-05-01")
    ap.add_argument("--to", dest="d1", default="2018-06-30")
    ap.add_argument("--far", type=float, default=0.01)
    a = ap.parse_args()
    d0, d1 = dt.date.fromisoformat(a.d0), dt.date.fromisoformat(a.d1)

    cols = [f"smart_{k}_raw" for k in CRIT]
    g = "serial_number"
    df = (
        pl.scan_parquet(a.data)
        .select(g, "date", "failure", *cols)
        .filter(pl.col("date") <= d1)
        .sort(g, "date")
        .with_columns([pl.col(c).forward_fill().over(g) for c in cols])
        .with_columns(
            above=pl.any_horizontal([pl.col(c) > 0 for c in cols]).fill_null(False),
            rose=pl.any_horizontal([(pl.col(c) - pl.col(c).shift(1).over(g)) > 0 for c in cols]).fill_null(False),
        )
        .filter(pl.col("date") >= d0)
        .collect()
    )
    fails = df.filter(pl.col("failure") == 1).group_by(g).agg(pl.col("date").min().alias("f"))
    df = df.join(fails, on=g, how="left")
    lead = (pl.col("f") - pl.col("date")).dt.total_days()
    failed = df.filter(pl.col("f").is_not_null())
    win = (
        failed.filter((lead >= 1) & (lead <= H))
        .group_by(g)
        .agg(above=pl.col("above").any(), rose=pl.col("rose").any())
    )
    n_failed = failed[g].n_unique()
    rose = win.filter(pl.col("rose")).height
    static = win.filter(pl.col("above") & ~pl.col("rose")).height
    quiet = n_failed - rose - static

    healthy = df.filter(pl.col("f").is_null()).group_by(g).agg(above=pl.col("above").any(), rose=pl.col("rose").any())
    n_h = healthy.height
    h_rose = healthy.filter(pl.col("rose")).height
    h_above = healthy.filter(pl.col("above")).height
    budget = math.floor(a.far * n_h)
    need = math.ceil(0.55 * n_failed)

    print(f"period {d0}..{d1}: {n_failed} failed drives, {n_h} healthy drives")
    print("failed drives, by what their critical counters showed in [f-10, f-1]:")
    print(f"  a counter rose:                  {rose:4d}  ({rose / n_failed:.3f})")
    print(f"  a counter above 0, none rose:    {static:4d}  ({static / n_failed:.3f})")
    print(f"  every counter 0 (or none seen):  {quiet:4d}  ({quiet / n_failed:.3f})")
    print("healthy drives, anywhere in the period:")
    print(f"  a counter rose:                  {h_rose:4d}  (FAR {h_rose / n_h:.4f})")
    print(f"  a counter above 0:               {h_above:4d}  (FAR {h_above / n_h:.4f})")
    print(f"FAR {a.far:.0%} allows {budget} healthy drives with an alarm; FDR 0.55 needs {need} detections.")
    print(
        f"Alarming on every rise detects {rose} and spends {h_rose} of the {budget}; the other "
        f"{need - rose} must come from the {static + quiet} failed drives without a rise, with at most "
        f"{budget - h_rose} alarms among the {n_h - h_rose} healthy drives without one "
        f"({(budget - h_rose) / max(n_h - h_rose, 1):.2%} of them)."
    )


if __name__ == "__main__":
    main()
