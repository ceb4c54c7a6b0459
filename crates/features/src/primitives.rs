//! The building blocks of every feature; offline code reuses them where polars cannot
//! express a definition directly.

use serde::{Deserialize, Serialize};

/// Exponentially weighted moving average, `m_0 = x_0`, `m_i = (1−α)·m_{i−1} + α·x_i`.
#[derive(
    Debug, Clone, Copy, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
pub struct Ewma {
    value: f64,
    primed: bool,
}

impl Default for Ewma {
    fn default() -> Self {
        Self::new()
    }
}

impl Ewma {
    /// An average that has seen nothing.
    pub const fn new() -> Self {
        Self {
            value: 0.0,
            primed: false,
        }
    }

    /// Folds in `x` with weight `alpha` and returns the new average.
    #[inline]
    pub fn update(&mut self, x: f64, alpha: f64) -> f64 {
        self.value = if self.primed {
            (1.0 - alpha) * self.value + alpha * x
        } else {
            x
        };
        self.primed = true;
        self.value
    }

    /// The current average (0 before the first update).
    pub fn value(&self) -> f64 {
        self.value
    }

    /// Whether it has seen a value.
    pub fn is_primed(&self) -> bool {
        self.primed
    }
}

/// Slow exponentially weighted mean and second moment of a series, for z-scores.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
pub struct EwMoments {
    mean: Ewma,
    sq: Ewma,
    n: u64,
}

impl EwMoments {
    /// Scores `x` against the moments so far (see [`zscore`]), then folds it in.
    #[inline]
    pub fn score_then_update(
        &mut self,
        x: f64,
        alpha: f64,
        warmup: u64,
        floor: f64,
        clip: f64,
    ) -> f64 {
        let z = if self.n < warmup {
            0.0
        } else {
            zscore(x, self.mean.value(), self.sq.value(), floor, clip)
        };
        self.mean.update(x, alpha);
        self.sq.update(x * x, alpha);
        // saturating: a restored state may hold any count
        self.n = self.n.saturating_add(1);
        z
    }

    /// Mean so far.
    pub fn mean(&self) -> f64 {
        self.mean.value()
    }

    /// Variance so far (`E[x²] − E[x]²`, clamped at 0).
    pub fn variance(&self) -> f64 {
        (self.sq.value() - self.mean.value() * self.mean.value()).max(0.0)
    }
}

/// `clip((x − μ) / max(√max(q − μ², 0), floor), −clip, clip)`.
#[inline]
pub fn zscore(x: f64, mean: f64, mean_sq: f64, floor: f64, clip: f64) -> f64 {
    let sd = (mean_sq - mean * mean).max(0.0).sqrt().max(floor);
    ((x - mean) / sd).clamp(-clip, clip)
}

/// Sums of `K` quantities over the last `W` records, O(1) per record.
///
/// Values are stored as given; sums are kept exact for integer-valued inputs (all the
/// windowed quantities of [`crate::Feature`] are counts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RingSums<const K: usize> {
    #[serde(with = "ring_serde")]
    ring: Vec<[f64; K]>,
    pos: usize,
    len: usize,
    #[serde(with = "arr_serde")]
    sums: [f64; K],
}

/// The shape every decoded window must have (an empty ring or a position
/// past its end would panic at the next push).
fn check_shape(window: u64, pos: u64, len: u64) -> Result<(), String> {
    if !(1..=MAX_DECODED_WINDOW).contains(&window) {
        return Err(format!(
            "window {window} is not in 1..={MAX_DECODED_WINDOW}"
        ));
    }
    if pos >= window || len > window {
        return Err(format!(
            "position {pos} / length {len} do not fit a window of {window}"
        ));
    }
    Ok(())
}

/// serde `deserialize_with` for a [`RingSums`] read from outside (a
/// persisted host state): refuses a shape that would panic at the next push.
/// The bincode decoder checks the same itself.
pub(crate) fn checked_ring<'de, D: serde::Deserializer<'de>, const K: usize>(
    d: D,
) -> Result<RingSums<K>, D::Error> {
    let r = RingSums::<K>::deserialize(d)?;
    check_shape(r.ring.len() as u64, r.pos as u64, r.len as u64)
        .map_err(serde::de::Error::custom)?;
    Ok(r)
}

impl<const K: usize> RingSums<K> {
    /// Sums over the last `window` records; `window` must be at least 1.
    pub fn new(window: usize) -> Self {
        let window = window.max(1);
        Self {
            ring: vec![[0.0; K]; window],
            pos: 0,
            len: 0,
            sums: [0.0; K],
        }
    }

    /// Adds this record's values (dropping the oldest when the window is full) and
    /// returns the sums over the window.
    #[inline]
    pub fn push(&mut self, values: [f64; K]) -> &[f64; K] {
        let full = self.len == self.ring.len();
        let slot = &mut self.ring[self.pos];
        if full {
            for (sum, old) in self.sums.iter_mut().zip(slot.iter()) {
                *sum -= old;
            }
        } else {
            self.len += 1;
        }
        for (sum, new) in self.sums.iter_mut().zip(values.iter()) {
            *sum += new;
        }
        *slot = values;
        self.pos += 1;
        if self.pos == self.ring.len() {
            self.pos = 0;
        }
        &self.sums
    }

    /// The sums over the window.
    pub fn sums(&self) -> &[f64; K] {
        &self.sums
    }

    /// The row the next [`Self::push`] reads and overwrites.
    #[inline]
    pub(crate) fn next_row(&self) -> &[f64; K] {
        &self.ring[self.pos]
    }

    /// Every row, oldest or not.
    #[inline]
    pub(crate) fn rows(&self) -> &[[f64; K]] {
        &self.ring
    }
}

/// Asks the CPU to start loading the cache lines of `v` (a hint: no effect
/// on results, and none on targets without a prefetch instruction).
#[inline]
pub(crate) fn prefetch<T: ?Sized>(v: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let p = (v as *const T).cast::<i8>();
        let mut off = 0;
        while off < std::mem::size_of_val(v) {
            // SAFETY: `_mm_prefetch` needs SSE, which every x86_64 CPU has
            // (it is in the target's baseline). A prefetch only hints the
            // cache: it reads nothing into the program and never faults,
            // whatever the address; this one is inside `v` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off)) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

// bincode layout of a `RingSums`, its own and the same under any bincode
// config: three varints (window, position, length), then every value of the
// ring in order and the sums, each as in `push_value`.

/// Largest window a decoded [`RingSums`] may claim (the bound of
/// `FeatureParams::window`), so a corrupt length allocates nothing big.
const MAX_DECODED_WINDOW: u64 = 10_000;

/// One value in the compact binary layout: an integer-valued `v` in
/// `[0, 2^52)` (every windowed quantity is a count, mostly 0) as the varint
/// `2v`, anything else as `1` followed by its IEEE bits as a varint, so the
/// round trip is exact for every f64 (-0.0 and NaN payloads included) and a
/// zero costs one byte instead of eight. Written into `buf` with bincode's
/// standard varint (< 251: one byte; 251/252/253: u16/u32/u64 LE follows),
/// and handed to the encoder's writer once per window: a writer call per
/// value was most of the encoding time.
fn push_value(buf: &mut Vec<u8>, v: f64) {
    const LIMIT: f64 = (1u64 << 52) as f64;
    // `v as u64` truncates, so it round-trips exactly when `v` is an integer
    // in range: one conversion each way instead of `fract()`, whose `trunc`
    // is a libm call on baseline x86-64 (~1 % of the job's CPU).
    if (0.0..LIMIT).contains(&v) && (v as u64) as f64 == v && v.to_bits() != (-0.0f64).to_bits() {
        push_varint(buf, (v as u64) << 1);
    } else {
        buf.push(1);
        push_varint(buf, v.to_bits());
    }
}

fn push_varint(buf: &mut Vec<u8>, x: u64) {
    if x < 251 {
        buf.push(x as u8);
    } else if let Ok(x) = u16::try_from(x) {
        buf.push(251);
        buf.extend_from_slice(&x.to_le_bytes());
    } else if let Ok(x) = u32::try_from(x) {
        buf.push(252);
        buf.extend_from_slice(&x.to_le_bytes());
    } else {
        buf.push(253);
        buf.extend_from_slice(&x.to_le_bytes());
    }
}

fn read_varint<D: bincode::de::Decoder>(d: &mut D) -> Result<u64, bincode::error::DecodeError> {
    use bincode::de::read::Reader;
    let mut b = [0u8; 8];
    d.reader().read(&mut b[..1])?;
    let n = match b[0] {
        x @ 0..=250 => return Ok(u64::from(x)),
        251 => 2,
        252 => 4,
        253 => 8,
        x => {
            return Err(bincode::error::DecodeError::OtherString(format!(
                "window varint tag {x}"
            )));
        }
    };
    b[0] = 0;
    d.reader().read(&mut b[..n])?;
    Ok(u64::from_le_bytes(b))
}

fn read_value<D: bincode::de::Decoder>(d: &mut D) -> Result<f64, bincode::error::DecodeError> {
    match read_varint(d)? {
        1 => Ok(f64::from_bits(read_varint(d)?)),
        c if c & 1 == 0 => Ok((c >> 1) as f64),
        c => Err(bincode::error::DecodeError::OtherString(format!(
            "window value code {c} is neither an integer nor the escape 1"
        ))),
    }
}

impl<const K: usize> bincode::Encode for RingSums<K> {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        e: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        use bincode::enc::write::Writer;
        // The worst case (every value escaped: ten bytes), so no push grows it.
        let mut buf = Vec::with_capacity(30 + (self.ring.len() + 1) * K * 10);
        push_varint(&mut buf, self.ring.len() as u64);
        push_varint(&mut buf, self.pos as u64);
        push_varint(&mut buf, self.len as u64);
        for &v in self.ring.iter().flatten().chain(&self.sums) {
            // Most windowed counts are zero: one compare for them.
            if v.to_bits() == 0 {
                buf.push(0);
            } else {
                push_value(&mut buf, v);
            }
        }
        e.writer().write(&buf)
    }
}

impl<Context, const K: usize> bincode::Decode<Context> for RingSums<K> {
    fn decode<D: bincode::de::Decoder<Context = Context>>(
        d: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        let window = read_varint(d)?;
        let pos = read_varint(d)?;
        let len = read_varint(d)?;
        check_shape(window, pos, len).map_err(bincode::error::DecodeError::OtherString)?;
        let mut ring = Vec::with_capacity(window as usize);
        for _ in 0..window {
            let mut row = [0.0; K];
            for v in &mut row {
                *v = read_value(d)?;
            }
            ring.push(row);
        }
        let mut sums = [0.0; K];
        for v in &mut sums {
            *v = read_value(d)?;
        }
        Ok(Self {
            ring,
            pos: pos as usize,
            len: len as usize,
            sums,
        })
    }
}

impl<'de, Context, const K: usize> bincode::BorrowDecode<'de, Context> for RingSums<K> {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = Context>>(
        d: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        bincode::Decode::decode(d)
    }
}

mod arr_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, const K: usize>(v: &[f64; K], s: S) -> Result<S::Ok, S::Error> {
        v.as_slice().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const K: usize>(
        d: D,
    ) -> Result<[f64; K], D::Error> {
        let v = Vec::<f64>::deserialize(d)?;
        v.try_into().map_err(|v: Vec<f64>| {
            serde::de::Error::invalid_length(v.len(), &"one sum per windowed quantity")
        })
    }
}

mod ring_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, const K: usize>(
        v: &[[f64; K]],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let flat: Vec<&[f64]> = v.iter().map(|r| r.as_slice()).collect();
        flat.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const K: usize>(
        d: D,
    ) -> Result<Vec<[f64; K]>, D::Error> {
        let rows = Vec::<Vec<f64>>::deserialize(d)?;
        rows.into_iter()
            .map(|r| {
                r.try_into().map_err(|r: Vec<f64>| {
                    serde::de::Error::invalid_length(r.len(), &"one value per windowed quantity")
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_count_at_its_maximum_saturates() {
        let mut m = EwMoments {
            n: u64::MAX,
            ..EwMoments::default()
        };
        assert_eq!(m.score_then_update(10.0, 0.1, 5, 1.0, 5.0), 5.0);
        // wrapped to 0, the second record would be back in warm-up (z = 0)
        assert_eq!(m.score_then_update(20.0, 0.1, 5, 1.0, 5.0), 5.0);
        assert_eq!(m.n, u64::MAX);
    }
    use proptest::prelude::*;

    #[test]
    fn a_window_of_counts_encodes_in_a_byte_a_value_and_bad_shapes_are_refused() {
        let mut ring = RingSums::<10>::new(36);
        for i in 0..50 {
            ring.push([
                0.0,
                0.0,
                1.0,
                0.0,
                0.0,
                0.0,
                0.0,
                0.0,
                f64::from(i % 2),
                0.0,
            ]);
        }
        let cfg = bincode::config::standard();
        let bytes = bincode::encode_to_vec(&ring, cfg).unwrap();
        // 3 header varints + 370 one-byte values (sums up to 36 -> 2v = 72 < 251)
        assert_eq!(bytes.len(), 3 + 36 * 10 + 10);
        let shape = |window: u64, pos: u64, len: u64| {
            let mut b = bincode::encode_to_vec((window, pos, len), cfg).unwrap();
            b.extend(std::iter::repeat_n(0u8, 12));
            bincode::decode_from_slice::<RingSums<2>, _>(&b, cfg).map(|_| ())
        };
        assert!(shape(3, 2, 3).is_ok());
        for (w, p, l) in [(0, 0, 0), (10_001, 0, 0), (3, 3, 0), (3, 0, 4)] {
            let e = shape(w, p, l).unwrap_err().to_string();
            assert!(e.contains("window") || e.contains("position"), "{e}");
        }
        let odd = bincode::encode_to_vec((1u64, 0u64, 0u64, 3u64), cfg).unwrap();
        let e = bincode::decode_from_slice::<RingSums<1>, _>(&odd, cfg).unwrap_err();
        assert!(e.to_string().contains("escape"), "{e}");
    }

    proptest! {
        #[test]
        fn ring_sums_match_naive_window(window in 1usize..20, xs in proptest::collection::vec(0u32..1000, 0..200)) {
            let mut ring = RingSums::<2>::new(window);
            for i in 0..xs.len() {
                let got = *ring.push([f64::from(xs[i]), 1.0]);
                let lo = (i + 1).saturating_sub(window);
                let want: f64 = xs[lo..=i].iter().map(|&x| f64::from(x)).sum();
                prop_assert_eq!(got[0], want);
                prop_assert_eq!(got[1], (i + 1 - lo) as f64);
            }
        }

        #[test]
        fn ring_sums_round_trip_bincode_bit_for_bit(
            window in 1usize..40,
            xs in proptest::collection::vec(
                prop_oneof![
                    4 => (0u64..5).prop_map(|v| v as f64),
                    1 => any::<u64>().prop_map(f64::from_bits),
                    1 => Just(-0.0f64),
                    1 => Just((1u64 << 52) as f64),
                    1 => Just((1u64 << 52) as f64 - 0.5),
                    1 => (0u64..1000).prop_map(|v| v as f64 + 0.5),
                    1 => Just(f64::INFINITY),
                ],
                0..120,
            ),
        ) {
            let mut ring = RingSums::<3>::new(window);
            for x in &xs {
                ring.push([*x, 1.0, -*x]);
            }
            let cfg = bincode::config::standard();
            let bytes = bincode::encode_to_vec(&ring, cfg).unwrap();
            let (back, used): (RingSums<3>, usize) = bincode::decode_from_slice(&bytes, cfg).unwrap();
            prop_assert_eq!(used, bytes.len());
            let bits = |r: &RingSums<3>| -> Vec<u64> {
                r.ring.iter().flatten().chain(r.sums.iter()).map(|v| v.to_bits()).collect()
            };
            prop_assert_eq!(bits(&back), bits(&ring));
            prop_assert_eq!((back.pos, back.len), (ring.pos, ring.len));
            // and any prefix of the bytes is refused, never a panic
            for cut in 0..bytes.len() {
                prop_assert!(bincode::decode_from_slice::<RingSums<3>, _>(&bytes[..cut], cfg).is_err());
            }
        }

        #[test]
        fn ewma_matches_closed_form(alpha in 0.01f64..1.0, xs in proptest::collection::vec(-1e3f64..1e3, 1..100)) {
            let mut e = Ewma::new();
            for &x in &xs { e.update(x, alpha); }
            // closed form of the adjust=false recursion
            let n = xs.len();
            let mut want = (1.0 - alpha).powi((n - 1) as i32) * xs[0];
            for (i, &x) in xs.iter().enumerate().skip(1) {
                want += alpha * (1.0 - alpha).powi((n - 1 - i) as i32) * x;
            }
            prop_assert!((e.value() - want).abs() <= 1e-9 * (1.0 + want.abs()), "{} vs {}", e.value(), want);
        }

        #[test]
        fn moments_track_mean_and_variance(alpha in 0.01f64..0.5, xs in proptest::collection::vec(-100f64..100.0, 2..100)) {
            let mut m = EwMoments::default();
            let mut mean = Ewma::new();
            let mut sq = Ewma::new();
            for &x in &xs {
                let z = m.score_then_update(x, alpha, 0, 1e-3, 1e9);
                let want = zscore(x, mean.value(), sq.value(), 1e-3, 1e9);
                prop_assert!((z - want).abs() <= 1e-9 * (1.0 + want.abs()));
                mean.update(x, alpha);
                sq.update(x * x, alpha);
            }
            prop_assert!(m.variance() >= 0.0);
        }
    }

    #[test]
    fn zscore_respects_floor_and_clip() {
        assert_eq!(zscore(5.0, 5.0, 25.0, 0.5, 10.0), 0.0);
        assert_eq!(zscore(6.0, 5.0, 25.0, 0.5, 10.0), 2.0);
        assert_eq!(zscore(100.0, 5.0, 25.0, 0.5, 10.0), 10.0);
    }

    #[test]
    fn ring_serde_round_trips() {
        let mut r = RingSums::<3>::new(4);
        for i in 0..6 {
            r.push([f64::from(i), 1.0, 2.0]);
        }
        let back: RingSums<3> = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.sums(), &[2.0 + 3.0 + 4.0 + 5.0, 4.0, 8.0]);
        assert!(serde_json::from_str::<RingSums<2>>(&serde_json::to_string(&r).unwrap()).is_err());
        for bad in [
            r#"{"ring":[],"pos":0,"len":0,"sums":[0,0]}"#,
            r#"{"ring":[[0,0]],"pos":1,"len":0,"sums":[0,0]}"#,
            r#"{"ring":[[0,0]],"pos":0,"len":2,"sums":[0,0]}"#,
        ] {
            let mut de = serde_json::Deserializer::from_str(bad);
            let e = checked_ring::<_, 2>(&mut de).unwrap_err().to_string();
            assert!(e.contains("window"), "{bad}: {e}");
        }
    }
}
