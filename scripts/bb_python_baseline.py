#!/usr/bin/env python3
"""Python reference for the Rust Backblaze trainer: the same work, timed.

Builds the SMART features (the definitions of crates/features), labels (failure within
1..=10 days), trains a random forest on Jan-Apr (labels known by Apr 30; negatives
subsampled), picks the alarm threshold on an inner calibration period, and evaluates on
May-Jun with the protocol's FDR / FAR / median lead.

usage: bb_python_baseline.py DATA.parquet [--trees N] [--seed S]
Needs: pip install polars numpy scikit-learn
"""
import argparse
import datetime as dt
import time

import numpy as np
import polars as pl
from sklearn.ensemble import RandomForestClassifier

H = 10
CRIT = [5, 187, 188, 197, 198]
W = 14  # window, records (days)
FAST_ALPHA = 0.3
HOURS_CAP = 10_000.0
DAY = dt.date


def features(lf: pl.LazyFrame) -> pl.LazyFrame:
    smart = [f"smart_{k}_raw" for k in CRIT + [9, 194]]
    lf = lf.sort("serial_number", "date").with_columns(
        [pl.col(c).forward_fill().over("serial_number") for c in smart]
    ).filter(pl.all_horizontal([pl.col(c).is_not_null() for c in smart]))
    ts_h = pl.col("date").cast(pl.Int64) * 24
    exprs = []
    for k in CRIT:
        c = pl.col(f"smart_{k}_raw").cast(pl.Float64)
        d = (c - c.shift(1)).over("serial_number").fill_null(0.0)
        exprs += [c.alias(f"smart_{k}"), d.alias(f"smart_{k}_delta")]
    lf = lf.with_columns(exprs, ts_h=ts_h)
    exprs = []
    for k in CRIT:
        d = pl.col(f"smart_{k}_delta")
        pos = d.clip(lower_bound=0.0)
        exprs.append(pos.rolling_sum(W, min_samples=1).over("serial_number").alias(f"smart_{k}_rise_w"))
        last = pl.when(d > 0).then(pl.col("ts_h")).otherwise(None).forward_fill().over("serial_number")
        exprs.append(((pl.col("ts_h") - last).cast(pl.Float64).clip(upper_bound=HOURS_CAP)).fill_null(HOURS_CAP).alias(f"smart_{k}_hours_since_rise"))
    exprs.append(pl.col("smart_194_raw").cast(pl.Float64).ewm_mean(alpha=FAST_ALPHA, adjust=False).over("serial_number").alias("smart_194_ewma"))
    exprs.append(pl.col("smart_9_raw").cast(pl.Float64).alias("smart_9"))
    exprs.append((pl.col("ts_h") - pl.col("ts_h").shift(1)).over("serial_number").fill_null(0).cast(pl.Float64).alias("dt_hours"))
    exprs.append(pl.int_range(1, pl.len() + 1).over("serial_number").cast(pl.Float64).alias("records_seen"))
    lf = lf.with_columns(exprs)
    lf = lf.with_columns(
        smart_crit_any=pl.any_horizontal([pl.col(f"smart_{k}") > 0 for k in CRIT]).cast(pl.Float64),
        smart_crit_rose=pl.any_horizontal([pl.col(f"smart_{k}_delta") > 0 for k in CRIT]).cast(pl.Float64),
        smart_crit_rise_w=pl.sum_horizontal([pl.col(f"smart_{k}_rise_w") for k in CRIT]),
    )
    return lf


FEATS = []
for k in CRIT:
    FEATS += [f"smart_{k}", f"smart_{k}_delta", f"smart_{k}_rise_w", f"smart_{k}_hours_since_rise"]
FEATS += ["smart_crit_any", "smart_crit_rose", "smart_crit_rise_w", "smart_9", "smart_194_ewma"]
# like the Rust forest: without dt_hours and records_seen (they describe the observation
# window, not the drive; records_seen in the test period lies beyond its training range)


def labelled(df: pl.DataFrame, end: dt.date) -> pl.DataFrame:
    """Rows up to `end` whose label is known at `end`; failures after `end` are unseen."""
    seen = df.filter(pl.col("date") <= end)
    fails = seen.filter(pl.col("failure") == 1).select("serial_number", pl.col("date").alias("fdate"))
    x = seen.join(fails, on="serial_number", how="left")
    days = (pl.col("fdate") - pl.col("date")).dt.total_days()
    x = x.with_columns(label=((days >= 1) & (days <= H)).fill_null(False))
    known = pl.col("fdate").is_not_null() | (pl.col("date") <= end - dt.timedelta(days=H))
    return x.filter(known & ~(days == 0).fill_null(False))


def sample(x: pl.DataFrame, neg: int, seed: int) -> pl.DataFrame:
    pos = x.filter(pl.col("label"))
    n = x.filter(~pl.col("label"))
    return pl.concat([pos, n.sample(min(neg, n.height), seed=seed)])


def evaluate(df, alarms, d0, d1):
    df = df.filter((pl.col("date") >= d0) & (pl.col("date") <= d1))
    a = alarms.filter((pl.col("date") >= d0) & (pl.col("date") <= d1) & pl.col("alarm"))
    fails = df.filter(pl.col("failure") == 1).select("serial_number", pl.col("date").alias("fdate"))
    hits = a.join(fails, on="serial_number").with_columns(lead=(pl.col("fdate") - pl.col("date")).dt.total_days()).filter((pl.col("lead") >= 1) & (pl.col("lead") <= H))
    det = hits.group_by("serial_number").agg(pl.col("lead").max())
    failed = set(fails["serial_number"])
    healthy = df.select("serial_number").unique().filter(~pl.col("serial_number").is_in(list(failed))).height
    fa = a.filter(~pl.col("serial_number").is_in(list(failed)))["serial_number"].n_unique()
    return det.height / max(1, len(failed)), fa / max(1, healthy), det["lead"].median()


def far_threshold(scored: pl.DataFrame, d0, d1, target: float) -> float:
    """Smallest threshold whose drive-level FAR over [d0, d1] is <= target."""
    p = scored.filter((pl.col("date") >= d0) & (pl.col("date") <= d1))
    failed = p.filter(pl.col("failure") == 1)["serial_number"]
    mx = p.filter(~pl.col("serial_number").is_in(failed.implode())).group_by("serial_number").agg(pl.col("score").max())["score"].to_numpy()
    k = int(np.floor(target * len(mx)))
    s = np.sort(mx)[::-1]
    return float(s[k]) + 1e-12 if k < len(s) else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--trees", type=int, default=40)
    ap.add_argument("--neg", type=int, default=60_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--target-far", type=float, default=0.008)
    args = ap.parse_args()
    t0 = time.perf_counter()
    df = features(pl.scan_parquet(args.data)).collect()
    t1 = time.perf_counter()
    train_end, cal_start = DAY(2018, 4, 30), DAY(2018, 3, 1)
    fit_end = cal_start - dt.timedelta(days=1)
    X = lambda d: d.select(FEATS).to_numpy()

    def fit(end):
        s = sample(labelled(df, end), args.neg, args.seed)
        m = RandomForestClassifier(n_estimators=args.trees, max_depth=8, min_samples_leaf=5, max_samples=0.6, max_features=0.6, n_jobs=2, random_state=args.seed)
        m.fit(X(s), s["label"].to_numpy())
        return m
    # threshold: a model fitted on data up to Feb 28 scores Mar-Apr (a period as long as the test)
    cal = fit(fit_end)
    part = df.filter(pl.col("date") >= cal_start - dt.timedelta(days=0)).filter(pl.col("date") <= train_end)
    part = part.with_columns(score=pl.Series(cal.predict_proba(X(part))[:, 1]))
    thr = far_threshold(part, cal_start, train_end, args.target_far)
    model = fit(train_end)
    t2 = time.perf_counter()
    test = df.filter(pl.col("date") >= DAY(2018, 5, 1))
    test = test.with_columns(score=pl.Series(model.predict_proba(X(test))[:, 1]))
    alarms = test.select("serial_number", "date", alarm=pl.col("score") >= thr)
    fdr, far, lead = evaluate(df, alarms, DAY(2018, 5, 1), DAY(2018, 6, 30))
    t3 = time.perf_counter()
    print(f"threshold={thr:.4f} validation May-Jun: FDR={fdr:.3f} FAR={far:.4f} median_lead={lead}")
    print(f"timings_s features={t1-t0:.2f} train={t2-t1:.2f} evaluate={t3-t2:.2f} total={t3-t0:.2f}")


if __name__ == "__main__":
    main()
