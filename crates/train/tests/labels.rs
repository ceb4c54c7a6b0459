//! Labels never look forward past the end of the training period.
// Rows index several parallel columns.
#![allow(clippy::needless_range_loop)]

mod common;

use waterbear_train::{BbData, Day, labels_known_at, load_backblaze, parse_day};

fn truncated(data: &BbData, end: Day) -> (BbData, Vec<usize>) {
    let keep: Vec<usize> = (0..data.len()).filter(|&i| data.date[i] <= end).collect();
    let mut t = data.clone();
    t.drive = keep.iter().map(|&i| data.drive[i]).collect();
    t.date = keep.iter().map(|&i| data.date[i]).collect();
    t.failure = keep.iter().map(|&i| data.failure[i]).collect();
    for k in 0..5 {
        t.crit[k] = keep.iter().map(|&i| data.crit[k][i]).collect();
    }
    (t, keep)
}

#[test]
fn labels_at_end_ignore_everything_after_end() {
    let data = load_backblaze(&common::sample_bb()).unwrap();
    let end = parse_day("2018-04-30").unwrap();
    let full = labels_known_at(&data, end, 10);
    let (cut, keep) = truncated(&data, end);
    let part = labels_known_at(&cut, end, 10);
    for (j, &i) in keep.iter().enumerate() {
        assert_eq!(
            full[i], part[j],
            "row {i}: label depends on data after the end"
        );
    }
    for i in 0..data.len() {
        if data.date[i] > end {
            assert_eq!(full[i], None, "a row after the end has a label");
        }
    }
    // drives failing in the first days after the end: their last training rows are
    // unknown, never positive
    let mut seen = 0;
    for i in 0..data.len() {
        if data.failure[i] && data.date[i] > end && data.date[i] <= end + 10 {
            let d = data.drive[i];
            for j in 0..data.len() {
                if data.drive[j] == d && data.date[j] > end - 10 && data.date[j] <= end {
                    assert_eq!(
                        full[j], None,
                        "row {j} is labelled with a failure seen after the end"
                    );
                    seen += 1;
                }
            }
        }
    }
    assert!(seen > 0, "the sample has a failure just after the end");
    // and positives exist: the horizon of failures before the end
    assert!(full.iter().filter(|l| **l == Some(true)).count() > 100);
}

#[test]
fn positives_are_the_ten_days_before_a_failure() {
    let data = load_backblaze(&common::sample_bb()).unwrap();
    let end = parse_day("2018-06-30").unwrap();
    let l = labels_known_at(&data, end, 10);
    for i in 0..data.len() {
        if data.failure[i] {
            let f = data.date[i];
            for j in 0..data.len() {
                if data.drive[j] == data.drive[i] {
                    let d = data.date[j];
                    let want = if d >= f { None } else { Some(f - d <= 10) };
                    assert_eq!(
                        l[j], want,
                        "drive {} day {d} failing {f}",
                        data.serials[data.drive[i] as usize]
                    );
                }
            }
            break;
        }
    }
}
