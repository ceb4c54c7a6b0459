//! Framing shared by the migration stream and the agent protocol.
//!
//! Every frame is a 16-byte little-endian header followed by the payload:
//!
//! | bytes | field                                            |
//! |-------|--------------------------------------------------|
//! | 0..4  | magic (`WBMG` migration, `WBAG` agent)           |
//! | 4..6  | protocol version                                 |
//! | 6..8  | frame kind                                       |
//! | 8..12 | payload length (checked against a size cap)      |
//! | 12..16| CRC32 of the payload                             |
//!
//! Nothing in a payload is used before its length was checked against the
//! cap and its CRC verified.

use std::io::{self, IoSlice, Read, Write};

/// Header length in bytes.
pub const HEADER_LEN: usize = 16;

/// Errors reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o error on the stream: {0}")]
    Io(#[from] io::Error),
    #[error("bad magic {found:#010x}, expected {expected:#010x}")]
    BadMagic { expected: u32, found: u32 },
    #[error("unsupported protocol version {found} (this build speaks {supported})")]
    UnsupportedVersion { supported: u16, found: u16 },
    #[error("frame of {len} bytes exceeds the cap of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("payload checksum mismatch: header says {expected:#010x}, payload has {found:#010x}")]
    ChecksumMismatch { expected: u32, found: u32 },
    #[error("unexpected frame kind {found}, expected {expected}")]
    UnexpectedKind { expected: String, found: u16 },
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("payload JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// A protocol: its magic, version and payload size cap.
#[derive(Debug, Clone, Copy)]
pub struct Protocol {
    pub magic: u32,
    pub version: u16,
    pub max_payload: u32,
}

/// A parsed, not yet payload-verified header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u16,
    pub len: u32,
    pub crc: u32,
}

impl Protocol {
    /// Encodes a header for `payload_len` bytes with checksum `crc`.
    pub fn header(
        &self,
        kind: u16,
        payload_len: usize,
        crc: u32,
    ) -> Result<[u8; HEADER_LEN], FrameError> {
        if payload_len as u64 > u64::from(self.max_payload) {
            return Err(FrameError::TooLarge {
                len: payload_len as u64,
                max: u64::from(self.max_payload),
            });
        }
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&self.magic.to_le_bytes());
        h[4..6].copy_from_slice(&self.version.to_le_bytes());
        h[6..8].copy_from_slice(&kind.to_le_bytes());
        h[8..12].copy_from_slice(&(payload_len as u32).to_le_bytes());
        h[12..16].copy_from_slice(&crc.to_le_bytes());
        Ok(h)
    }

    /// Decodes and validates a header (magic, version, size cap).
    pub fn parse_header(&self, h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        let word = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&h[r]);
            u32::from_le_bytes(b)
        };
        let magic = word(0..4);
        if magic != self.magic {
            return Err(FrameError::BadMagic {
                expected: self.magic,
                found: magic,
            });
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != self.version {
            return Err(FrameError::UnsupportedVersion {
                supported: self.version,
                found: version,
            });
        }
        let kind = u16::from_le_bytes([h[6], h[7]]);
        let len = word(8..12);
        if len > self.max_payload {
            return Err(FrameError::TooLarge {
                len: u64::from(len),
                max: u64::from(self.max_payload),
            });
        }
        Ok(Header {
            kind,
            len,
            crc: word(12..16),
        })
    }

    /// Writes one frame whose payload is the concatenation of `parts`.
    pub fn write_frame<W: Write>(
        &self,
        w: &mut W,
        kind: u16,
        parts: &[&[u8]],
    ) -> Result<(), FrameError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut hasher = crc32fast::Hasher::new();
        for p in parts {
            hasher.update(p);
        }
        let header = self.header(kind, len, hasher.finalize())?;
        // One vectored write for header and payload: a large payload does
        // not leave the header behind as a separate small segment.
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() + 1);
        slices.push(IoSlice::new(&header));
        slices.extend(
            parts
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| IoSlice::new(p)),
        );
        write_all_vectored(w, &mut slices)?;
        Ok(())
    }

    /// Writes a frame with a JSON payload.
    pub fn write_json<W: Write, T: serde::Serialize>(
        &self,
        w: &mut W,
        kind: u16,
        value: &T,
    ) -> Result<(), FrameError> {
        let payload = serde_json::to_vec(value)?;
        self.write_frame(w, kind, &[&payload])
    }

    /// Reads and validates a header.
    pub fn read_header<R: Read>(&self, r: &mut R) -> Result<Header, FrameError> {
        let mut h = [0u8; HEADER_LEN];
        r.read_exact(&mut h)?;
        self.parse_header(&h)
    }

    /// Reads one whole frame, verifying its checksum.
    pub fn read_frame<R: Read>(&self, r: &mut R) -> Result<(u16, Vec<u8>), FrameError> {
        let header = self.read_header(r)?;
        let mut payload = vec![0u8; header.len as usize];
        r.read_exact(&mut payload)?;
        verify_crc(header.crc, &[&payload])?;
        Ok((header.kind, payload))
    }
}

/// Writes all of `slices`, retrying short and interrupted writes.
fn write_all_vectored<W: Write>(w: &mut W, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Checks that the CRC32 over `parts` equals `expected`.
pub fn verify_crc(expected: u32, parts: &[&[u8]]) -> Result<(), FrameError> {
    let mut hasher = crc32fast::Hasher::new();
    for p in parts {
        hasher.update(p);
    }
    let found = hasher.finalize();
    if found != expected {
        return Err(FrameError::ChecksumMismatch { expected, found });
    }
    Ok(())
}

/// Decodes a JSON payload.
pub fn decode_json<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Protocol = Protocol {
        magic: 0x4754_5354,
        version: 3,
        max_payload: 64,
    };

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        P.write_frame(&mut buf, 7, &[b"hello ", b"world"]).unwrap();
        let (kind, payload) = P.read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(kind, 7);
        assert_eq!(payload, b"hello world");
    }

    #[test]
    fn corruption_is_rejected_with_typed_errors() {
        let mut buf = Vec::new();
        P.write_frame(&mut buf, 1, &[b"payload"]).unwrap();

        let mut bad = buf.clone();
        bad[HEADER_LEN + 2] ^= 0x40;
        assert!(matches!(
            P.read_frame(&mut bad.as_slice()),
            Err(FrameError::ChecksumMismatch { .. })
        ));

        let mut bad = buf.clone();
        bad[0] ^= 1;
        assert!(matches!(
            P.read_frame(&mut bad.as_slice()),
            Err(FrameError::BadMagic { .. })
        ));

        let mut bad = buf.clone();
        bad[4] = 9;
        assert!(matches!(
            P.read_frame(&mut bad.as_slice()),
            Err(FrameError::UnsupportedVersion { found: 9, .. })
        ));

        let mut bad = buf.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            P.read_frame(&mut bad.as_slice()),
            Err(FrameError::TooLarge { .. })
        ));

        let truncated = &buf[..buf.len() - 1];
        assert!(matches!(
            P.read_frame(&mut &truncated[..]),
            Err(FrameError::Io(_))
        ));

        assert!(matches!(
            P.write_frame(&mut Vec::new(), 1, &[&[0u8; 65]]),
            Err(FrameError::TooLarge { len: 65, max: 64 })
        ));
    }
}
