//! The value corral stores in memcached: a small versioned binary record.
//!
//! ```text
//! magic   "CRRL"            4 bytes
//! version 2                 1 byte
//! meta    u32 len + bytes   pingora's CacheMeta internal part (msgpack, versioned by pingora)
//! header  u32 len + bytes   pingora's serialised response header
//! filler  u64               the corral whose clock `updated` is (purge records from the same
//!                           corral compare without `purge.clock_skew`)
//! body    u32 len + bytes
//! ```
//! All lengths are big-endian and checked against what is left: a value that is foreign,
//! truncated, of another version, or has trailing bytes fails to decode with a reason, and is
//! treated as a miss, never served and never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use pingora_cache::CacheMeta;

const MAGIC: &[u8; 4] = b"CRRL";
const VERSION: u8 = 2;

/// How far ahead of this clock a value's validation time may be (the largest
/// `purge.clock_skew`).
const MAX_AHEAD: std::time::Duration = std::time::Duration::from_secs(60);

/// A decoded record.
pub struct Record {
    pub meta: CacheMeta,
    /// The corral that validated it ([`crate::purge::corral_id`]).
    pub filler: u64,
    pub body: Bytes,
}

/// Why a value could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a corral record")]
    Foreign,
    #[error("record version {0}, this corral reads {VERSION}")]
    Version(u8),
    #[error("truncated record")]
    Truncated,
    #[error("{0} trailing bytes")]
    Trailing(usize),
    #[error("validated {0} s ahead of this clock: planted, or a clock far off")]
    Future(u64),
    #[error("bad metadata: {0}")]
    Meta(String),
}

/// Encode `meta`, who validated it, and `body`. Fails only if pingora cannot serialise the
/// metadata.
pub fn encode(meta: &CacheMeta, filler: u64, body: &[u8]) -> pingora_error::Result<Bytes> {
    let (internal, header) = meta.serialize()?;
    Ok(encode_parts(&internal, &header, filler, body))
}

/// Encode already serialised metadata (`CacheMeta::serialize`) with `filler` and `body`.
pub fn encode_parts(internal: &[u8], header: &[u8], filler: u64, body: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + 20 + internal.len() + header.len() + body.len());
    buf.put_slice(MAGIC);
    buf.put_u8(VERSION);
    for part in [internal, header] {
        buf.put_u32(part.len() as u32);
        buf.put_slice(part);
    }
    buf.put_u64(filler);
    buf.put_u32(body.len() as u32);
    buf.put_slice(body);
    buf.freeze()
}

fn take(buf: &mut Bytes) -> Result<Bytes, DecodeError> {
    if buf.remaining() < 4 {
        return Err(DecodeError::Truncated);
    }
    let len = buf.get_u32() as usize;
    if buf.remaining() < len {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.split_to(len))
}

/// Decode a value read from memcached.
pub fn decode(mut buf: Bytes) -> Result<Record, DecodeError> {
    if buf.len() < 5 || &buf[..4] != MAGIC {
        return Err(DecodeError::Foreign);
    }
    buf.advance(4);
    let version = buf.get_u8();
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let internal = take(&mut buf)?;
    let header = take(&mut buf)?;
    if buf.remaining() < 8 {
        return Err(DecodeError::Truncated);
    }
    let filler = buf.get_u64();
    let body = take(&mut buf)?;
    if buf.has_remaining() {
        return Err(DecodeError::Trailing(buf.remaining()));
    }
    let meta = CacheMeta::deserialize(&internal, &header).map_err(|e| DecodeError::Meta(e.to_string()))?;
    // a copy validated in the future would pass every purge record: whoever can write to
    // memcached could plant one. Clocks may differ by `purge.clock_skew`, at most a minute
    if let Ok(ahead) = meta.updated().duration_since(std::time::SystemTime::now()) {
        if ahead > MAX_AHEAD {
            return Err(DecodeError::Future(ahead.as_secs()));
        }
    }
    Ok(Record { meta, filler, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_http::ResponseHeader;
    use std::time::{Duration, SystemTime};

    fn meta() -> CacheMeta {
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.append_header("content-type", "text/html").unwrap();
        h.append_header("etag", "\"x\"").unwrap();
        let now = SystemTime::now();
        let mut m = CacheMeta::new(now + Duration::from_secs(60), now, 10, 300, h);
        m.set_variance_key([7; 16]);
        m
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&meta(), 42, b"hello").unwrap();
        let r = decode(bytes).unwrap();
        assert_eq!(&r.body[..], b"hello");
        assert_eq!(r.filler, 42);
        assert_eq!(r.meta.headers()["etag"], "\"x\"");
        assert_eq!(r.meta.variance(), Some([7; 16]));
        assert_eq!(r.meta.stale_while_revalidate_sec(), 10);
        assert_eq!(r.meta.stale_if_error_sec(), 300);
        assert!(r.meta.is_fresh(SystemTime::now()));
    }

    #[test]
    fn a_value_validated_in_the_future_is_refused() {
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.append_header("etag", "\"x\"").unwrap();
        let later = SystemTime::now() + Duration::from_secs(3600 * 24 * 365);
        let planted = CacheMeta::new(later + Duration::from_secs(60), later, 0, 0, h);
        let bytes = encode(&planted, 42, b"poison").unwrap();
        assert!(matches!(decode(bytes), Err(DecodeError::Future(_))));
    }

    #[test]
    fn foreign_values_are_refused() {
        assert_eq!(decode(Bytes::from_static(b"")).err(), Some(DecodeError::Foreign));
        assert_eq!(
            decode(Bytes::from_static(b"hello world")).err(),
            Some(DecodeError::Foreign)
        );
    }

    #[test]
    fn other_versions_are_refused() {
        let mut v = encode(&meta(), 1, b"x").unwrap().to_vec();
        v[4] = 9;
        assert_eq!(decode(Bytes::from(v)).err(), Some(DecodeError::Version(9)));
    }

    #[test]
    fn every_truncation_is_refused() {
        let full = encode(&meta(), 1, b"body").unwrap();
        for cut in 0..full.len() {
            assert!(decode(full.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut long = full.to_vec();
        long.push(0);
        assert_eq!(decode(Bytes::from(long)).err(), Some(DecodeError::Trailing(1)));
    }

    #[test]
    fn garbage_metadata_is_refused() {
        let mut buf = BytesMut::new();
        buf.put_slice(MAGIC);
        buf.put_u8(VERSION);
        for part in [&b"\xff\xfe"[..], b"junk"] {
            buf.put_u32(part.len() as u32);
            buf.put_slice(part);
        }
        buf.put_u64(1);
        buf.put_u32(4);
        buf.put_slice(b"body");
        assert!(matches!(decode(buf.freeze()), Err(DecodeError::Meta(_))));
    }
}
