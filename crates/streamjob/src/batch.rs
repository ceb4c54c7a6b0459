//! The scores topic's record: a [`ScoreBatch`], the scores of one cluster from
//! one input partition within one transaction, in input order.
//!
//! One Kafka record per batch instead of one per telemetry record: the broker
//! and both clients handle ~1/1000 of the messages, and the decider decodes
//! borrowed strings instead of parsing JSON. Binary layout (Firecracker style):
//! a magic, a version and a size cap, then bincode (standard config):
//!
//! ```text
//! "WBSB" | version u16 LE | bincode (cluster, model, count) | count x HostScore
//! ```

use bincode::config::{Config, standard};
use bincode::de::read::{BorrowReader, Reader};
use bincode::de::{BorrowDecode, BorrowDecoder, Decode, DecoderImpl};
use bincode::error::DecodeError;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use waterbear_features::Feature;
use waterbear_models::{Reason, Signature};

/// First bytes of every batch.
pub const SCORE_BATCH_MAGIC: [u8; 4] = *b"WBSB";
/// Layout version this build writes and reads.
pub const SCORE_BATCH_VERSION: u16 = 1;
/// Largest batch this build decodes (the writer closes a batch long before:
/// [`MAX_SCORES_PER_BATCH`] scores are a few hundred KiB).
pub const SCORE_BATCH_MAX_BYTES: usize = 4 << 20;
/// Scores after which the writer closes a batch, so a record stays well under
/// Kafka's default 1 MB `message.max.bytes`.
pub const MAX_SCORES_PER_BATCH: u32 = 2000;

/// bincode's standard config, with a limit: a length prefix claiming more than a
/// whole batch may hold is refused before anything is allocated for it (found by
/// the `score_batch` fuzz target: a claimed 47 TB string).
fn cfg() -> impl Config {
    standard().with_limit::<SCORE_BATCH_MAX_BYTES>()
}

/// One host's score (stage 1 -> stage 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostScore<'a> {
    /// Host id.
    pub host: &'a str,
    /// Fault domain.
    pub fd: u32,
    /// Update domain.
    pub ud: u32,
    /// VMs on the host.
    pub vms: u32,
    /// Rack of the host (the policy's common-cause guard groups by it).
    pub rack: &'a str,
    /// Guest memory on the host, MiB (the policy's evacuation-time estimate).
    pub vm_mem_mib: u64,
    /// Record timestamp, ms.
    pub ts: i64,
    /// Risk in [0, 1] (exact f64 round trip).
    pub score: f64,
    /// Failure signature.
    pub sig: Signature,
    /// Strongest reasons first (a detector gives at most three, which sit
    /// inline: no allocation per score on either side).
    pub reasons: SmallVec<[Reason; 3]>,
}

/// A decoded batch, borrowing its strings from the record.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreBatch<'a> {
    /// Cluster (also the record key).
    pub cluster: &'a str,
    /// Detector name@version that scored them.
    pub model: &'a str,
    /// The scores, in input order.
    pub scores: Vec<HostScore<'a>>,
}

/// Why a scores-topic record was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScoreBatchError {
    /// Shorter than the header.
    #[error("score batch of {0} bytes is shorter than its 6-byte header")]
    Truncated(usize),
    /// Over [`SCORE_BATCH_MAX_BYTES`].
    #[error("score batch of {0} bytes is over the {SCORE_BATCH_MAX_BYTES}-byte cap")]
    TooLarge(usize),
    /// Not a score batch.
    #[error("not a score batch: magic {0:02x?}")]
    Magic([u8; 4]),
    /// A layout this build does not read.
    #[error("score batch version {0}, this build reads version {SCORE_BATCH_VERSION}")]
    Version(u16),
    /// The body does not decode (names the part).
    #[error("score batch {part}: {message}")]
    Body {
        /// `header`, `score N` or `trailing bytes`.
        part: String,
        /// The decoder's message.
        message: String,
    },
}

/// Accumulates the encoded scores of one batch.
#[derive(Debug, Default)]
pub struct ScoreBatchWriter {
    body: Vec<u8>,
    count: u32,
}

impl ScoreBatchWriter {
    /// Appends one score.
    ///
    /// Field by field with bincode's own encoders: the same bytes as
    /// `HostScore`'s serde encoding (which the decoder reads; a proptest
    /// compares the two), without serde's adapter and `io::Write` calls, which
    /// were ~4 % of the job's CPU.
    pub fn push(&mut self, s: &HostScore<'_>) {
        use bincode::Encode;
        let mut e = bincode::enc::EncoderImpl::new(VecOut(&mut self.body), cfg());
        let r: Result<(), bincode::error::EncodeError> = (|| {
            s.host.encode(&mut e)?;
            s.fd.encode(&mut e)?;
            s.ud.encode(&mut e)?;
            s.vms.encode(&mut e)?;
            s.rack.encode(&mut e)?;
            s.vm_mem_mib.encode(&mut e)?;
            s.ts.encode(&mut e)?;
            s.score.encode(&mut e)?;
            // serde writes a unit variant as its index
            (s.sig as u32).encode(&mut e)?;
            (s.reasons.len() as u64).encode(&mut e)?;
            for r in &s.reasons {
                // `Feature` serialises as its name
                r.feature.name().encode(&mut e)?;
                r.value.encode(&mut e)?;
                r.contribution.encode(&mut e)?;
            }
            Ok(())
        })();
        r.expect("encoding into a Vec cannot fail");
        self.count += 1;
    }

    /// Scores held.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether no score is held.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The record payload of the scores pushed so far; the writer is empty after.
    pub fn finish(&mut self, cluster: &str, model: &str) -> Vec<u8> {
        let mut out = Vec::new();
        self.finish_into(cluster, model, &mut out);
        out
    }

    /// [`ScoreBatchWriter::finish`] into `out` (cleared first), reusing its
    /// memory. The writer keeps its own buffer's capacity for the next batch.
    pub fn finish_into(&mut self, cluster: &str, model: &str, out: &mut Vec<u8>) {
        out.clear();
        out.reserve(self.body.len() + cluster.len() + model.len() + 16);
        out.extend_from_slice(&SCORE_BATCH_MAGIC);
        out.extend_from_slice(&SCORE_BATCH_VERSION.to_le_bytes());
        bincode::serde::encode_into_std_write((cluster, model, self.count), &mut *out, cfg())
            .expect("encoding into a Vec cannot fail");
        out.extend_from_slice(&self.body);
        self.body.clear();
        self.count = 0;
    }

    /// An empty writer that writes into `buf` (cleared first).
    pub fn with_buffer(mut buf: Vec<u8>) -> Self {
        buf.clear();
        Self {
            body: buf,
            count: 0,
        }
    }

    /// The writer's buffer, for another writer (see
    /// [`ScoreBatchWriter::with_buffer`]).
    pub fn into_buffer(self) -> Vec<u8> {
        self.body
    }
}

/// bincode's writer for a `Vec` (its own is private).
struct VecOut<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for VecOut<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// The memory of an emptied score vector, for scores that borrow from another
/// record. Safe code: std collects a `vec::IntoIter` mapped to a type of the
/// same layout into the same allocation (a test checks that it still does; if
/// it did not, this would only allocate).
fn relabel<'b, 'c>(mut v: Vec<HostScore<'b>>) -> Vec<HostScore<'c>> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector is empty"))
        .collect()
}

impl<'a> ScoreBatch<'a> {
    /// Decodes and checks a scores-topic record.
    pub fn decode(payload: &'a [u8]) -> Result<Self, ScoreBatchError> {
        Self::decode_reusing(payload, Vec::new())
    }

    /// [`ScoreBatch::decode`] into the memory of `buf` (from
    /// [`ScoreBatch::into_buffer`]): a batch of 2,000 scores is ~300 KiB, and
    /// a fresh vector for each came from fresh pages the kernel had to zero.
    pub fn decode_reusing(
        payload: &'a [u8],
        buf: Vec<HostScore<'static>>,
    ) -> Result<Self, ScoreBatchError> {
        if payload.len() > SCORE_BATCH_MAX_BYTES {
            return Err(ScoreBatchError::TooLarge(payload.len()));
        }
        if payload.len() < 6 {
            return Err(ScoreBatchError::Truncated(payload.len()));
        }
        let magic: [u8; 4] = payload[..4].try_into().expect("4 bytes");
        if magic != SCORE_BATCH_MAGIC {
            return Err(ScoreBatchError::Magic(magic));
        }
        let version = u16::from_le_bytes([payload[4], payload[5]]);
        if version != SCORE_BATCH_VERSION {
            return Err(ScoreBatchError::Version(version));
        }
        let body = |part: String, e: bincode::error::DecodeError| ScoreBatchError::Body {
            part,
            message: e.to_string(),
        };
        let mut rest = &payload[6..];
        let ((cluster, model, count), used): ((&str, &str, u32), usize) =
            bincode::serde::borrow_decode_from_slice(rest, cfg())
                .map_err(|e| body("header".into(), e))?;
        rest = &rest[used..];
        // every score takes more than 8 bytes: a count beyond that is a lie
        if count as usize > rest.len() / 8 + 1 {
            return Err(ScoreBatchError::Body {
                part: "header".into(),
                message: format!("count {count} does not fit in {} bytes", rest.len()),
            });
        }
        let mut scores = relabel(buf);
        scores.reserve(count as usize);
        let mut d = DecoderImpl::new(Bytes(rest), cfg(), ());
        for i in 0..count {
            let s = read_score(&mut d).map_err(|e| body(format!("score {i}"), e))?;
            scores.push(s);
        }
        // what the reader has not consumed
        let rest = d.borrow_reader().0;
        if !rest.is_empty() {
            return Err(ScoreBatchError::Body {
                part: "trailing bytes".into(),
                message: format!("{} bytes after the last score", rest.len()),
            });
        }
        Ok(Self {
            cluster,
            model,
            scores,
        })
    }

    /// The scores' memory, emptied, for [`ScoreBatch::decode_reusing`].
    pub fn into_buffer(self) -> Vec<HostScore<'static>> {
        relabel(self.scores)
    }
}

/// bincode's slice reader, with what is left readable (`SliceReader` keeps
/// it private).
struct Bytes<'a>(&'a [u8]);

impl Reader for Bytes<'_> {
    #[inline]
    fn read(&mut self, bytes: &mut [u8]) -> Result<(), DecodeError> {
        let Some((head, tail)) = self.0.split_at_checked(bytes.len()) else {
            return Err(DecodeError::UnexpectedEnd {
                additional: bytes.len() - self.0.len(),
            });
        };
        bytes.copy_from_slice(head);
        self.0 = tail;
        Ok(())
    }

    #[inline]
    fn peek_read(&mut self, n: usize) -> Option<&[u8]> {
        self.0.get(..n)
    }

    #[inline]
    fn consume(&mut self, n: usize) {
        // bincode consumes only what `peek_read` returned; past the end
        // would leave nothing to read
        self.0 = &self.0[n.min(self.0.len())..];
    }
}

impl<'a> BorrowReader<'a> for Bytes<'a> {
    #[inline]
    fn take_bytes(&mut self, length: usize) -> Result<&'a [u8], DecodeError> {
        let Some((head, tail)) = self.0.split_at_checked(length) else {
            return Err(DecodeError::UnexpectedEnd {
                additional: length - self.0.len(),
            });
        };
        self.0 = tail;
        Ok(head)
    }
}

/// One [`HostScore`] in the order [`ScoreBatchWriter::push`] writes it and
/// serde's derive reads it (a proptest compares the two), without serde's
/// adapter: it was ~5 % of the job's CPU in the decider.
fn read_score<'a>(
    d: &mut DecoderImpl<Bytes<'a>, impl Config, ()>,
) -> Result<HostScore<'a>, DecodeError> {
    let host: &'a str = BorrowDecode::borrow_decode(d)?;
    let fd = u32::decode(d)?;
    let ud = u32::decode(d)?;
    let vms = u32::decode(d)?;
    let rack: &'a str = BorrowDecode::borrow_decode(d)?;
    let vm_mem_mib = u64::decode(d)?;
    let ts = i64::decode(d)?;
    let score = f64::decode(d)?;
    let sig = u32::decode(d)?;
    let sig = *Signature::ALL
        .get(sig as usize)
        .ok_or(DecodeError::Other("unknown signature index"))?;
    let n = u64::decode(d)?;
    let mut reasons = SmallVec::new();
    for _ in 0..n {
        let name: &'a str = BorrowDecode::borrow_decode(d)?;
        let feature = Feature::from_name(name).ok_or(DecodeError::Other("unknown feature"))?;
        let value = f64::decode(d)?;
        let contribution = f64::decode(d)?;
        reasons.push(Reason {
            feature,
            value,
            contribution,
        });
    }
    Ok(HostScore {
        host,
        fd,
        ud,
        vms,
        rack,
        vm_mem_mib,
        ts,
        score,
        sig,
        reasons,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use waterbear_features::Feature;

    fn score<'a>(host: &'a str, rack: &'a str, ts: i64, v: f64, reasons: usize) -> HostScore<'a> {
        HostScore {
            host,
            fd: 3,
            ud: 1,
            vms: 7,
            rack,
            vm_mem_mib: 7 * 4096,
            ts,
            score: v,
            sig: Signature::Disk,
            reasons: (0..reasons)
                .map(|k| Reason {
                    feature: Feature::ALL[k % Feature::ALL.len()],
                    value: v * k as f64,
                    contribution: 1.0 / (k as f64 + 1.0),
                })
                .collect(),
        }
    }

    proptest! {
        #[test]
        fn round_trips_exactly(
            items in proptest::collection::vec(
                ("[a-z0-9-]{0,12}", "[a-z0-9]{0,6}", any::<i64>(), any::<f64>(), 0usize..4),
                0..50,
            ),
            cluster in "[a-z0-9]{0,8}",
        ) {
            let want: Vec<HostScore<'_>> = items
                .iter()
                .map(|(h, r, ts, v, n)| score(h, r, *ts, *v, *n))
                .collect();
            let mut w = ScoreBatchWriter::default();
            for s in &want {
                w.push(s);
            }
            prop_assert_eq!(w.len() as usize, want.len());
            let bytes = w.finish(&cluster, "rule-baseline@1");
            prop_assert!(w.is_empty());
            let got = ScoreBatch::decode(&bytes).unwrap();
            prop_assert_eq!(got.cluster, cluster.as_str());
            prop_assert_eq!(got.model, "rule-baseline@1");
            prop_assert_eq!(got.scores.len(), want.len());
            for (g, w) in got.scores.iter().zip(&want) {
                // bit-exact floats (NaN included)
                prop_assert_eq!(g.score.to_bits(), w.score.to_bits());
                prop_assert_eq!((g.host, g.rack, g.ts, g.fd, g.ud, g.vms, g.vm_mem_mib, g.sig),
                    (w.host, w.rack, w.ts, w.fd, w.ud, w.vms, w.vm_mem_mib, w.sig));
                prop_assert_eq!(g.reasons.len(), w.reasons.len());
            }
        }

        #[test]
        fn the_writer_writes_serdes_bytes(
            host in "\\PC{0,30}",
            rack in "\\PC{0,300}",
            fd in any::<u32>(), ud in any::<u32>(), vms in any::<u32>(),
            mem in any::<u64>(), ts in any::<i64>(), v in any::<f64>(),
            sig in 0usize..Signature::ALL.len(),
            reasons in proptest::collection::vec(
                (0usize..Feature::ALL.len(), any::<f64>(), any::<f64>()), 0..4),
        ) {
            let s = HostScore {
                host: &host, fd, ud, vms, rack: &rack, vm_mem_mib: mem, ts, score: v,
                sig: Signature::ALL[sig],
                reasons: reasons.iter().map(|&(f, value, contribution)| Reason {
                    feature: Feature::ALL[f], value, contribution,
                }).collect(),
            };
            let mut w = ScoreBatchWriter::default();
            w.push(&s);
            let want = bincode::serde::encode_to_vec(&s, cfg()).unwrap();
            prop_assert_eq!(&w.body, &want);
        }

        #[test]
        fn the_reader_agrees_with_serde_on_any_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..120),
            valid in any::<bool>(),
            v in any::<f64>(), n in 0usize..4,
        ) {
            // half the cases start from a real score, so both get deep
            let mut input = if valid {
                let mut w = ScoreBatchWriter::default();
                w.push(&score("h-1", "r-1", 42, v, n));
                w.body
            } else {
                Vec::new()
            };
            input.extend_from_slice(&bytes);
            let ours = {
                let mut d = DecoderImpl::new(Bytes(&input), cfg(), ());
                read_score(&mut d).map(|s| (s, input.len() - d.borrow_reader().0.len()))
            };
            let theirs: Result<(HostScore<'_>, usize), _> =
                bincode::serde::borrow_decode_from_slice(&input, cfg());
            match (ours, theirs) {
                (Ok((a, used_a)), Ok((b, used_b))) => {
                    prop_assert_eq!(used_a, used_b);
                    prop_assert_eq!(a.score.to_bits(), b.score.to_bits());
                    prop_assert_eq!((a.host, a.rack, a.ts, a.fd, a.ud, a.vms, a.vm_mem_mib, a.sig),
                        (b.host, b.rack, b.ts, b.fd, b.ud, b.vms, b.vm_mem_mib, b.sig));
                    prop_assert_eq!(a.reasons.len(), b.reasons.len());
                    for (x, y) in a.reasons.iter().zip(&b.reasons) {
                        prop_assert_eq!(x.feature, y.feature);
                        prop_assert_eq!(x.value.to_bits(), y.value.to_bits());
                        prop_assert_eq!(x.contribution.to_bits(), y.contribution.to_bits());
                    }
                }
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "ours {:?}, serde's {:?}", a.map(|x| x.1), b.map(|x| x.1)),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut framed = SCORE_BATCH_MAGIC.to_vec();
            framed.extend_from_slice(&SCORE_BATCH_VERSION.to_le_bytes());
            framed.extend_from_slice(&bytes);
            let _ = ScoreBatch::decode(&bytes);
            let _ = ScoreBatch::decode(&framed);
        }
    }

    #[test]
    fn decoding_reuses_the_last_batchs_memory_with_the_same_result() {
        let hosts: Vec<String> = (0..300).map(|i| format!("h{i}")).collect();
        let mut w = ScoreBatchWriter::default();
        let mut out = Vec::new();
        let mut payloads = Vec::new();
        for round in 0..3 {
            for (i, h) in hosts.iter().enumerate().skip(round * 50) {
                w.push(&score(h, "r1", i as i64, 0.001 * i as f64, i % 4));
            }
            // The writer's buffer and the payload buffer are both reused.
            let (body_before, out_before) = (w.body.as_ptr(), out.as_ptr());
            w.finish_into("c1", "m", &mut out);
            if round > 0 {
                assert_eq!(out.as_ptr(), out_before, "payload buffer reused");
                assert_eq!(w.body.as_ptr(), body_before, "writer buffer kept");
            }
            assert_eq!(out, w_finish_fresh(&hosts, round));
            payloads.push(out.clone());
        }
        let mut buf: Vec<HostScore<'static>> = Vec::new();
        let mut last_ptr = None;
        for p in &payloads {
            let b = ScoreBatch::decode_reusing(p, buf).unwrap();
            assert_eq!(b, ScoreBatch::decode(p).unwrap());
            if let Some(ptr) = last_ptr {
                assert_eq!(b.scores.as_ptr() as usize, ptr, "score vector reused");
            }
            last_ptr = Some(b.scores.as_ptr() as usize);
            buf = b.into_buffer();
            // the batches shrink (300, 250, 200 scores): the first one's memory stays
            assert!(
                buf.is_empty() && buf.capacity() >= 300,
                "{}",
                buf.capacity()
            );
        }
    }

    /// What `finish` writes for round `round` of the test above, from a new writer.
    fn w_finish_fresh(hosts: &[String], round: usize) -> Vec<u8> {
        let mut w = ScoreBatchWriter::default();
        for (i, h) in hosts.iter().enumerate().skip(round * 50) {
            w.push(&score(h, "r1", i as i64, 0.001 * i as f64, i % 4));
        }
        w.finish("c1", "m")
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let mut w = ScoreBatchWriter::default();
        w.push(&score("h1", "r1", 1, 0.5, 2));
        let good = w.finish("c1", "m");
        assert!(matches!(
            ScoreBatch::decode(&good[..4]),
            Err(ScoreBatchError::Truncated(4))
        ));
        assert!(matches!(
            ScoreBatch::decode(br#"{"host":"h1"}"#),
            Err(ScoreBatchError::Magic(_))
        ));
        let mut v2 = good.clone();
        v2[4] = 2;
        assert!(matches!(
            ScoreBatch::decode(&v2),
            Err(ScoreBatchError::Version(2))
        ));
        let e = ScoreBatch::decode(&good[..good.len() - 3]).unwrap_err();
        assert!(e.to_string().starts_with("score batch score 0"), "{e}");
        let mut long = good.clone();
        long.push(0);
        let e = ScoreBatch::decode(&long).unwrap_err();
        assert!(e.to_string().contains("trailing bytes"), "{e}");
        let huge = vec![0u8; SCORE_BATCH_MAX_BYTES + 1];
        assert!(matches!(
            ScoreBatch::decode(&huge),
            Err(ScoreBatchError::TooLarge(_))
        ));
    }

    #[test]
    fn a_huge_length_prefix_is_refused_without_allocating_it() {
        // the fuzz target's first finding: a reason's feature name claiming ~47 TB
        let crash: &[u8] = &[
            87, 66, 83, 66, 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 73, 0, 6, 0, 0, 0, 0, 0, 0, 38,
            253, 0, 0, 0, 0, 0, 43, 0, 0, 252, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 133, 0, 0, 0,
            0, 76, 0, 0, 251, 0, 243, 255, 44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16,
        ];
        assert!(matches!(
            ScoreBatch::decode(crash),
            Err(ScoreBatchError::Body { .. })
        ));
    }

    #[test]
    fn a_full_batch_stays_far_below_kafkas_default_record_cap() {
        let mut w = ScoreBatchWriter::default();
        for i in 0..MAX_SCORES_PER_BATCH {
            let h = format!("host-{i:06}");
            w.push(&score(
                &h,
                "rack-0001",
                i64::from(i) * 600_000,
                0.123456789,
                3,
            ));
        }
        let bytes = w.finish(
            "cluster-01",
            "rule-baseline+disk-bb@rule-baseline@1,disk-bb@v2",
        );
        assert!(bytes.len() < 512 * 1024, "{} bytes", bytes.len());
        assert_eq!(ScoreBatch::decode(&bytes).unwrap().scores.len(), 2000);
    }
}
