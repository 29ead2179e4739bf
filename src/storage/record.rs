//! The value corral stores in memcached: a small versioned binary record.
//!
//! ```text
//! magic   "CRRL"            4 bytes
//! version 1                 1 byte
//! meta    u32 len + bytes   pingora's CacheMeta internal part (msgpack, versioned by pingora)
//! header  u32 len + bytes   pingora's serialised response header
//! tags    u32 len + bytes   dependency tags, '\n'-separated (used by the purge API)
//! body    u32 len + bytes
//! ```
//! All lengths are big-endian and checked against what is left: a value that is foreign,
//! truncated, of another version, or has trailing bytes fails to decode with a reason, and is
//! treated as a miss, never served and never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use pingora_cache::CacheMeta;

const MAGIC: &[u8; 4] = b"CRRL";
const VERSION: u8 = 1;

/// A decoded record.
pub struct Record {
    pub meta: CacheMeta,
    pub tags: Vec<String>,
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
    #[error("bad metadata: {0}")]
    Meta(String),
}

/// Encode `meta`, `tags` and `body`. Fails only if pingora cannot serialise the metadata.
pub fn encode(meta: &CacheMeta, tags: &[String], body: &[u8]) -> pingora_error::Result<Bytes> {
    let (internal, header) = meta.serialize()?;
    Ok(encode_parts(&internal, &header, tags, body))
}

/// Encode already serialised metadata (`CacheMeta::serialize`) with `tags` and `body`.
pub fn encode_parts(internal: &[u8], header: &[u8], tags: &[String], body: &[u8]) -> Bytes {
    let tags = tags.join("\n");
    let mut buf = BytesMut::with_capacity(5 + 16 + internal.len() + header.len() + tags.len() + body.len());
    buf.put_slice(MAGIC);
    buf.put_u8(VERSION);
    for part in [internal, header, tags.as_bytes(), body] {
        buf.put_u32(part.len() as u32);
        buf.put_slice(part);
    }
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
    let tags = take(&mut buf)?;
    let body = take(&mut buf)?;
    if buf.has_remaining() {
        return Err(DecodeError::Trailing(buf.remaining()));
    }
    let meta = CacheMeta::deserialize(&internal, &header).map_err(|e| DecodeError::Meta(e.to_string()))?;
    let tags = std::str::from_utf8(&tags)
        .map_err(|_| DecodeError::Meta("tags are not UTF-8".into()))?
        .split('\n')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    Ok(Record { meta, tags, body })
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
        let bytes = encode(&meta(), &["a".into(), "b".into()], b"hello").unwrap();
        let r = decode(bytes).unwrap();
        assert_eq!(&r.body[..], b"hello");
        assert_eq!(r.tags, vec!["a", "b"]);
        assert_eq!(r.meta.headers()["etag"], "\"x\"");
        assert_eq!(r.meta.variance(), Some([7; 16]));
        assert_eq!(r.meta.stale_while_revalidate_sec(), 10);
        assert_eq!(r.meta.stale_if_error_sec(), 300);
        assert!(r.meta.is_fresh(SystemTime::now()));
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
        let mut v = encode(&meta(), &[], b"x").unwrap().to_vec();
        v[4] = 9;
        assert_eq!(decode(Bytes::from(v)).err(), Some(DecodeError::Version(9)));
    }

    #[test]
    fn every_truncation_is_refused() {
        let full = encode(&meta(), &["t".into()], b"body").unwrap();
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
        for part in [&b"\xff\xfe"[..], b"junk", b"", b"body"] {
            buf.put_u32(part.len() as u32);
            buf.put_slice(part);
        }
        assert!(matches!(decode(buf.freeze()), Err(DecodeError::Meta(_))));
    }
}
