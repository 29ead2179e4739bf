//! A stored response head, kept compact: L1 holds one per entry, and most entries are small.
//!
//! An `http::HeaderMap` costs about 112 bytes per field in its bucket vector plus an index,
//! and each value owning its bytes is one allocation (two once it is cloned: `Bytes` promotes
//! itself to a shared buffer); a (`HeaderName`, `HeaderValue`) pair alone is 72 bytes.
//! [`StoredHeader`] keeps the entry's URL and variance, every value and every name not in
//! [`KNOWN`] as text, and 8 bytes of lengths per field, in one buffer: one allocation per head
//! whatever its field count (an `Arc<[u8]>`: its counts are in the same allocation). A name
//! in [`KNOWN`] (most of them) is kept as its place there; a field's text follows the
//! previous field's. A hit builds the map it hands to Pingora from them: a known name is a
//! tag (no allocation), another one is copied; the values are slices of the buffer (shared,
//! never copied), checked again as they are built.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use bytes::{BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use pingora_cache::key::HashBinary;
use pingora_http::ResponseHeader;

use crate::fields::{Fields, Value};
use crate::policy::is_targeted;
use crate::purge::is_tag;

use super::origins::{split_origin, ORIGINS};
use super::Nanos;

/// What an `Arc<[u8]>` buffer holds beside its bytes: its two counts, in the same
/// allocation. (A `Bytes` made from a `Vec` allocates a shared block of 24 bytes, 32 with
/// the allocator's header, on its first clone, and keeps it for life: a buffer that every
/// entry has.)
pub(super) const BUFFER_COUNTS: usize = 16;

/// The buffer of a head with nothing in it, shared: none is allocated for it.
static EMPTY: LazyLock<Arc<[u8]>> = LazyLock::new(|| Arc::from(&[][..]));

/// A buffer of `len` bytes, written by `write` (which is given all of it, and must fill it),
/// in one allocation with its counts: no `Vec` copied into it. The bytes are zeroed first
/// (one `memset` pass before the copy: without `unsafe` there is no uninitialised slice to
/// write into).
pub(super) fn buffer(len: usize, write: impl FnOnce(&mut [u8])) -> Arc<[u8]> {
    if len == 0 {
        return Arc::clone(&EMPTY);
    }
    // an exact-length iterator: the slice is allocated once, at its size
    let mut buf: Arc<[u8]> = std::iter::repeat_n(0u8, len).collect();
    write(Arc::get_mut(&mut buf).expect("a slice just collected has no other owner"));
    buf
}

/// `buf` as `Bytes` that share it (not copied): one allocation, the owner's box (48 bytes),
/// which lasts as long as they do. A hit makes one and slices its values and body from it.
pub(super) fn shared(buf: &Arc<[u8]>) -> Bytes {
    Bytes::from_owner(Arc::clone(buf))
}

/// Response field names a hit takes from this table rather than from the buffer: the `http`
/// crate knows them (a tag, no allocation, no parsing per hit), and a stored head keeps their
/// number instead of their text. The common ones, and those a CMS sends on every page.
const KNOWN: [HeaderName; 30] = {
    use http::header::*;
    [
        ACCEPT_RANGES,
        ACCESS_CONTROL_ALLOW_ORIGIN,
        AGE,
        ALT_SVC,
        CACHE_CONTROL,
        CONNECTION,
        CONTENT_DISPOSITION,
        CONTENT_ENCODING,
        CONTENT_LANGUAGE,
        CONTENT_LENGTH,
        CONTENT_LOCATION,
        CONTENT_RANGE,
        CONTENT_SECURITY_POLICY,
        CONTENT_TYPE,
        DATE,
        ETAG,
        EXPIRES,
        LAST_MODIFIED,
        LINK,
        LOCATION,
        PRAGMA,
        REFERRER_POLICY,
        SERVER,
        SET_COOKIE,
        STRICT_TRANSPORT_SECURITY,
        TRANSFER_ENCODING,
        VARY,
        X_CONTENT_TYPE_OPTIONS,
        X_FRAME_OPTIONS,
        X_XSS_PROTECTION,
    ]
};

/// [`KNOWN`]'s names as text (a field's name is read from here, and `tests` checks that the
/// two lists agree): a hit looks names up in it, and `HeaderName::as_str` there instead cost
/// about 700 instructions per hit (`benches/callgrind.sh`, 49.1k-49.5k against 50.2k).
const KNOWN_NAMES: [&str; 30] = [
    "accept-ranges",
    "access-control-allow-origin",
    "age",
    "alt-svc",
    "cache-control",
    "connection",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-security-policy",
    "content-type",
    "date",
    "etag",
    "expires",
    "last-modified",
    "link",
    "location",
    "pragma",
    "referrer-policy",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "vary",
    "x-content-type-options",
    "x-frame-options",
    "x-xss-protection",
];

/// One field: its name's text (none for a name in [`KNOWN`]), then its value, consecutive in
/// the head's buffer, right after the field before (the first after the URL and the reason
/// phrase). A head is far below 4 GiB (Pingora refuses a head over its limit, memcached an
/// item over its own), and every read of the buffer is bounds-checked. Kept in the buffer's
/// table in 3 bytes for a known name and a value below 64 KiB, 4 for another name of up to
/// 255 bytes, 7 otherwise ([`Field::encode`]); where it starts is not kept, but summed as the
/// table is read ([`StoredHeader::fields`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Field {
    /// Where the name's text (or, for a known name, the value) starts in the head's part of
    /// the buffer (from [`StoredHeader::start`]).
    at: u32,
    value_len: u32,
    /// 0 for a known name.
    name_len: u16,
    sensitive: bool,
    /// 1 + the name's place in [`KNOWN`], 0 for another name.
    known: u8,
}

/// A [`Field`]'s last byte in the table ([`Field::encode`]): [`SENSITIVE`], [`WIDE`], and
/// the name's place in [`KNOWN`] plus one (0 for another name) in the low six bits.
const SENSITIVE: u8 = 0x80;
/// In a field's last byte: its lengths take 6 bytes (a 32-bit value length, a 16-bit name
/// length), not 2 or 3 (a 16-bit value length, and an 8-bit name length for a name not
/// known).
const WIDE: u8 = 0x40;
const KNOWN_BITS: u8 = 0x3f;
const _: () = assert!(
    KNOWN_NAMES.len() < KNOWN_BITS as usize,
    "a known name's number fits 6 bits"
);

/// Bytes of the epoch in the buffer ([`EPOCH`]): nanoseconds since the Unix epoch.
const EPOCH_LEN: usize = 8;

impl Field {
    /// Whether its lengths fit the short form (see [`WIDE`]).
    fn narrow(&self) -> bool {
        self.value_len <= u32::from(u16::MAX) && (self.known > 0 || self.name_len <= u16::from(u8::MAX))
    }

    /// Bytes it takes in the table.
    fn encoded_len(&self) -> usize {
        match (self.narrow(), self.known > 0) {
            (true, true) => 3,
            (true, false) => 4,
            (false, _) => 7,
        }
    }

    /// Its lengths, then its last byte ([`SENSITIVE`], [`WIDE`], the known name): the table
    /// holds the fields last first, so that it is read from its end, first field first, each
    /// field's last byte saying how many bytes come before it ([`Self::decode_back`]).
    fn encode(&self, out: &mut impl BufMut) {
        let narrow = self.narrow();
        if narrow {
            out.put_slice(&(self.value_len as u16).to_le_bytes());
            if self.known == 0 {
                out.put_u8(self.name_len as u8);
            }
        } else {
            out.put_slice(&self.value_len.to_le_bytes());
            out.put_slice(&self.name_len.to_le_bytes());
        }
        let sensitive = if self.sensitive { SENSITIVE } else { 0 };
        let wide = if narrow { 0 } else { WIDE };
        out.put_u8(sensitive | wide | (self.known & KNOWN_BITS));
    }

    /// The field whose encoding ends at `end` in `table` ([`Self::encode`]), its text starting
    /// at `at`, and where the encoding before it ends; `None` if `table` is too short.
    fn decode_back(table: &[u8], end: usize, at: u32) -> Option<(Field, usize)> {
        let last = end.checked_sub(1)?;
        let tag = *table.get(last)?;
        let known = tag & KNOWN_BITS;
        let lengths = match (tag & WIDE != 0, known > 0) {
            (true, _) => 6,
            (false, true) => 2,
            (false, false) => 3,
        };
        let from = last.checked_sub(lengths)?;
        let b = table.get(from..last)?;
        let (value_len, name_len) = match lengths {
            6 => (
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                u16::from_le_bytes([b[4], b[5]]),
            ),
            2 => (u32::from(u16::from_le_bytes([b[0], b[1]])), 0),
            _ => (u32::from(u16::from_le_bytes([b[0], b[1]])), u16::from(b[2])),
        };
        let field = Field {
            at,
            value_len,
            name_len,
            sensitive: tag & SENSITIVE != 0,
            known,
        };
        Some((field, from))
    }

    /// Bytes of text it takes in the buffer.
    fn text_len(&self) -> u32 {
        u32::from(self.name_len).saturating_add(self.value_len)
    }

    /// 1 + the place of `name` in [`KNOWN`], 0 if it is not there.
    fn known(name: &HeaderName) -> u8 {
        KNOWN.iter().position(|k| k == name).map_or(0, |i| i as u8 + 1)
    }

    /// [`Self::known`] for a name as text, in any case.
    fn known_text(name: &str) -> u8 {
        KNOWN_NAMES
            .iter()
            .position(|k| k.eq_ignore_ascii_case(name))
            .map_or(0, |i| i as u8 + 1)
    }
}

/// A response's status line and fields, with lower-case names (as a fast hit sends them, and
/// as HTTP/2 does), owning their bytes, and the URL and the variance of the entry they belong
/// to.
#[derive(Debug, Clone)]
pub struct StoredHeader {
    status: StatusCode,
    version: Version,
    /// [`STRIPPABLE`], [`VARIANCE`], [`EPOCH`], [`REASON`], [`LENGTH`], [`VARY`] and
    /// [`ORIGIN`].
    flags: u8,
    /// The URL's length in the buffer, which it opens (with [`ORIGIN`], its origin's number
    /// and the rest).
    url_len: u32,
    /// How many fields the buffer's table holds: it closes the buffer.
    count: u32,
    /// Where the head starts in `buf`: after the body it was packed with ([`Self::pack`]),
    /// which is `buf[..start]` ([`Self::body`]); 0 for a head of its own.
    start: u32,
    /// From `start`: the URL (with [`ORIGIN`], its origin's number and the rest), the variance
    /// (16 bytes, if [`VARIANCE`]), the epoch of `Age` (8 bytes, if [`EPOCH`]), the reason
    /// phrase (if [`REASON`]: its length in 2 bytes, then its text), every name not in [`KNOWN`] and
    /// every value in order, then the table of their [`Field`]s. The entry holds this one
    /// buffer for its head and its body. An `Arc<[u8]>`, not `Bytes`: 16 bytes in the entry
    /// instead of 32, and no shared block beside the buffer; a hit makes the `Bytes` it sends
    /// ([`shared`]).
    buf: Arc<[u8]>,
}

/// [`StoredHeader::flags`]: the head carries a tag header or a targeted cache-control field
/// (RFC 9213), the only fields a hit may strip, so a hit filters the others only if this is
/// set.
const STRIPPABLE: u8 = 1;
/// [`StoredHeader::flags`]: the entry has a variance (its response varies: Pingora keeps the
/// first variant of a URL in its primary slot, with one), kept in the buffer after the URL:
/// most entries of a CMS vary on `Accept-Encoding`, and in the entry it would take 17 bytes of
/// every one, or a box of its own.
const VARIANCE: u8 = 2;
/// [`StoredHeader::flags`]: the origin's answer carried an `Age`, and what `Age` counts from
/// is kept in the buffer after the variance ([`StoredHeader::epoch_override`]): it is fixed
/// by the response this head is (`updated` minus the age it arrived with), and most answers
/// come from the origin itself with none, so it takes 8 bytes of an entry only when it has one
/// (in the entry, 8 bytes of every one: its `Arc` one size class of the allocator larger).
const EPOCH: u8 = 32;
/// [`StoredHeader::flags`]: the reason phrase is not the status's canonical one, and is kept
/// in the buffer (rare: its length there too, not in every head).
const REASON: u8 = 4;
/// [`StoredHeader::flags`]: a `Content-Length` field is among the fields. The fast hit path
/// asks this, and [`VARY`], of every hit: a search of the fields by name costs about 450
/// instructions each.
const LENGTH: u8 = 8;
/// [`StoredHeader::flags`]: a `Vary` field is among the fields.
const VARY: u8 = 16;
/// [`StoredHeader::flags`]: the URL's origin (`http://host`) is kept as its number in
/// [`ORIGINS`] (2 bytes, little-endian), and the buffer's URL is the rest
/// ([`StoredHeader::url_parts`]): about 20 bytes less in every entry of a site.
const ORIGIN: u8 = 64;

/// `buf[range]`, the range clamped to `buf[..len]` (an end before the start: empty): shared,
/// not copied.
pub(super) fn body_slice(buf: &Arc<[u8]>, range: std::ops::Range<usize>, len: usize) -> Bytes {
    let end = range.end.min(len).min(buf.len());
    shared(buf).slice(range.start.min(end)..end)
}

fn offset(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl StoredHeader {
    /// A copy of `h` that owns its bytes, with no URL (a head that is not an entry's).
    pub fn new(h: &ResponseHeader) -> Self {
        Self::for_entry(h, "", None, None)
    }

    /// [`Self::for_entry`] with no variance.
    #[cfg(test)]
    pub fn with_url(h: &ResponseHeader, url: &str) -> Self {
        Self::for_entry(h, url, None, None)
    }

    /// A copy of `h` that owns its bytes, kept with the URL and the variance of its entry,
    /// and what its `Age` counts from if not the entry's `updated` (`epoch`).
    /// Pingora parses a response head in one read buffer of 4 KiB or more, and the values it
    /// hands over are slices of that buffer: a stored header must not keep the whole buffer
    /// alive (issue 8: 1 KB objects took 5x their budget in RSS), so names and values are
    /// copied, once, into one buffer of their own.
    pub fn for_entry(
        h: &ResponseHeader,
        url: &str,
        variance: Option<HashBinary>,
        epoch: Option<Nanos>,
    ) -> Self {
        let table: Vec<Field> = h
            .headers
            .iter()
            .map(|(name, value)| {
                let known = Field::known(name);
                // (a name is far shorter than 64 KiB: the http crate refuses a longer one)
                let name_len = if known > 0 {
                    0
                } else {
                    name.as_str().len().min(usize::from(u16::MAX))
                };
                Field {
                    at: 0,
                    value_len: offset(value.len()),
                    name_len: name_len as u16,
                    sensitive: value.is_sensitive(),
                    known,
                }
            })
            .collect();
        let text: usize = table.iter().map(|f| f.text_len() as usize).sum();
        let reason = h.get_reason_phrase();
        // (one too long to count in 16 bits, which no parser lets through, goes canonical)
        let reason = (reason != h.status.canonical_reason())
            .then(|| reason.unwrap_or(""))
            .filter(|r| r.len() <= usize::from(u16::MAX));
        // the origin's number instead of its text, if it has one
        let numbered = split_origin(url).and_then(|(origin, rest)| Some((ORIGINS.number(origin)?, rest)));
        let url_len = numbered.map_or(url.len(), |(_, rest)| 2 + rest.len());
        let size = url_len
            + variance.map_or(0, |v| v.len())
            + epoch.map_or(0, |_| EPOCH_LEN)
            + reason.map_or(0, |r| 2 + r.len())
            + text
            + table.iter().map(Field::encoded_len).sum::<usize>();
        let buf = buffer(size, |mut out| {
            match numbered {
                Some((n, rest)) => {
                    out.put_slice(&n.to_le_bytes());
                    out.put_slice(rest.as_bytes());
                }
                None => out.put_slice(url.as_bytes()),
            }
            out.put_slice(variance.as_ref().map_or(&[][..], |v| &v[..]));
            if let Some(epoch) = epoch {
                out.put_slice(&epoch.get_nanos().to_le_bytes());
            }
            if let Some(reason) = reason {
                out.put_slice(&(reason.len() as u16).to_le_bytes());
                out.put_slice(reason.as_bytes());
            }
            // (where each text starts is summed again as the table is read: not written)
            for ((name, value), field) in h.headers.iter().zip(&table) {
                out.put_slice(&name.as_str().as_bytes()[..usize::from(field.name_len)]);
                out.put_slice(value.as_bytes());
            }
            // last first: read from the buffer's end, first first (`fields`)
            for field in table.iter().rev() {
                field.encode(&mut out);
            }
            debug_assert!(out.is_empty(), "the head's size counts every byte written");
        });
        StoredHeader {
            status: h.status,
            version: h.version,
            flags: [
                (
                    h.headers
                        .keys()
                        .any(|n| is_tag(n.as_str()) || is_targeted(n.as_str())),
                    STRIPPABLE,
                ),
                (variance.is_some(), VARIANCE),
                (epoch.is_some(), EPOCH),
                (reason.is_some(), REASON),
                (h.headers.contains_key(http::header::CONTENT_LENGTH), LENGTH),
                (h.headers.contains_key(http::header::VARY), VARY),
                (numbered.is_some(), ORIGIN),
            ]
            .into_iter()
            .filter(|(on, _)| *on)
            .fold(0, |flags, (_, flag)| flags | flag),
            url_len: offset(url_len),
            count: offset(h.headers.len()),
            start: 0,
            buf,
        }
    }

    /// This head and a body (its chunks) copied into one buffer, the body first: an entry's
    /// one allocation for both. Returns the head in that buffer; the body is its
    /// [`Self::body`]. A body over `u32::MAX` bytes is not packed (the head's offsets are 32
    /// bits): it is returned, in a buffer of its own, beside a head of its own.
    pub fn pack(&self, body: &[Bytes]) -> (StoredHeader, Option<Arc<[u8]>>) {
        self.pack_below(body, u32::MAX as usize + 1)
    }

    /// [`Self::pack`], packing only a body below `limit` bytes (at most `u32::MAX` + 1).
    fn pack_below(&self, body: &[Bytes], limit: usize) -> (StoredHeader, Option<Arc<[u8]>>) {
        let len: usize = body.iter().map(Bytes::len).sum();
        let start = u32::try_from(len).ok().filter(|_| len < limit);
        let head = if start.is_some() { self.head() } else { &[] };
        let buf = buffer(len + head.len(), |mut out| {
            for chunk in body {
                out.put_slice(chunk);
            }
            out.put_slice(head);
            debug_assert!(out.is_empty());
        });
        match start {
            Some(start) => (
                StoredHeader {
                    status: self.status,
                    version: self.version,
                    flags: self.flags,
                    url_len: self.url_len,
                    count: self.count,
                    start,
                    buf,
                },
                None,
            ),
            // the body alone, beside a head of its own
            None => (self.clone(), Some(buf)),
        }
    }

    /// The whole buffer as `Bytes` that share it: one allocation ([`shared`]). A hit makes
    /// it once, for [`Self::map_in`] and [`Self::body_in`].
    pub fn shared(&self) -> Bytes {
        shared(&self.buf)
    }

    /// `shared` if it is this head's buffer ([`Self::shared`]), else this head's own.
    fn mine<'a>(&self, shared: &'a Bytes) -> Cow<'a, Bytes> {
        if shared.as_ptr() == self.buf.as_ptr() && shared.len() == self.buf.len() {
            Cow::Borrowed(shared)
        } else {
            Cow::Owned(self.shared())
        }
    }

    /// The buffer, its body first (`buf[..body_len]`): what a body moved apart keeps.
    pub(super) fn buffer(&self) -> &Arc<[u8]> {
        &self.buf
    }

    /// The body this head was packed with ([`Self::pack`]; empty for a head of its own):
    /// shared, not copied.
    pub fn body(&self) -> Bytes {
        self.body_in(&self.shared())
    }

    /// [`Self::body`], sliced from `shared`, this head's buffer ([`Self::shared`]).
    pub fn body_in(&self, shared: &Bytes) -> Bytes {
        self.mine(shared).slice(..self.start as usize)
    }

    /// `body()[range]`, clamped to the body (shared, not copied).
    pub fn body_slice(&self, range: std::ops::Range<usize>) -> Bytes {
        body_slice(&self.buf, range, self.start as usize)
    }

    /// Bytes of [`Self::body`].
    pub fn body_len(&self) -> usize {
        self.start as usize
    }

    /// The head's part of the buffer.
    fn head(&self) -> &[u8] {
        self.buf.get(self.start as usize..).unwrap_or_default()
    }

    /// Whether `other` is this head, in the same buffer.
    pub fn same(&self, other: &StoredHeader) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf) && self.start == other.start
    }

    /// The URL of the entry this head belongs to (`""`: none), put together again if its
    /// origin is kept apart ([`ORIGIN`]). A hit never reads it.
    pub fn url(&self) -> Cow<'_, str> {
        match self.url_parts() {
            ("", rest) => Cow::Borrowed(rest),
            (origin, rest) => Cow::Owned([origin, rest].concat()),
        }
    }

    /// The URL as its origin (`http://host`, `""` if the buffer holds the URL whole) and the
    /// rest, without putting them together.
    pub fn url_parts(&self) -> (&'static str, &str) {
        let url = self.url_len as usize;
        if self.flags & ORIGIN == 0 {
            return ("", self.text(0, url));
        }
        let number = self
            .head()
            .get(..2)
            .map_or(u16::MAX, |b| u16::from_le_bytes([b[0], b[1]]));
        let origin = ORIGINS.text(number);
        // (a number without its origin would match bans against the path alone)
        debug_assert!(
            !origin.is_empty(),
            "a numbered origin is kept for the process's life"
        );
        (origin, self.text(2, url))
    }

    /// The URL's host and path as [`super::split_url`] splits it (what bans match: the host
    /// unescaped), without putting the URL together.
    pub fn host_and_path(&self) -> (Cow<'_, str>, &str) {
        match self.url_parts() {
            ("", url) => super::split_url(url),
            // (an origin has no path: its split is its host)
            (origin, path) => (super::split_url(origin).0, path),
        }
    }

    /// The entry's variance, if it has one.
    pub fn variance(&self) -> Option<HashBinary> {
        let url = self.url_len as usize;
        (self.flags & VARIANCE != 0)
            .then(|| self.head().get(url..url + 16)?.try_into().ok())
            .flatten()
    }

    /// Where the epoch is ([`EPOCH`]): after the URL and the variance.
    fn epoch_at(&self) -> u32 {
        let variance = if self.flags & VARIANCE != 0 { 16 } else { 0 };
        self.url_len.saturating_add(variance)
    }

    /// What `Age` counts from, if the origin's answer carried an age ([`EPOCH`]): `None`
    /// means the entry's `updated`.
    pub fn epoch_override(&self) -> Option<Nanos> {
        let at = self.epoch_at() as usize;
        (self.flags & EPOCH != 0)
            .then(|| self.head().get(at..at + EPOCH_LEN)?.try_into().ok())
            .flatten()
            .and_then(|b| Nanos::from_nanos(u64::from_le_bytes(b)))
    }

    /// Where the reason phrase (its length first) is: after the URL, the variance and the
    /// epoch.
    fn reason_at(&self) -> u32 {
        let epoch = if self.flags & EPOCH != 0 {
            EPOCH_LEN as u32
        } else {
            0
        };
        self.epoch_at().saturating_add(epoch)
    }

    /// Bytes the reason phrase takes in the buffer, its length with it (0 for none kept).
    fn reason_span(&self) -> u32 {
        if self.flags & REASON == 0 {
            0
        } else {
            2 + u32::from(self.reason_len())
        }
    }

    /// The reason phrase's length, 0 if it is the status's canonical one (none kept).
    fn reason_len(&self) -> u16 {
        if self.flags & REASON == 0 {
            return 0;
        }
        let at = self.reason_at() as usize;
        self.head()
            .get(at..at + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
    }

    /// The reason phrase, if not the status's canonical one.
    fn reason(&self) -> Option<&str> {
        let at = self.reason_at() as usize + 2;
        (self.flags & REASON != 0).then(|| self.text(at, at + usize::from(self.reason_len())))
    }

    fn text(&self, from: usize, to: usize) -> &str {
        std::str::from_utf8(self.head().get(from..to).unwrap_or_default()).unwrap_or_default()
    }

    /// The fields, in order, from the buffer's table (read from the buffer's end: it holds
    /// them last first), each placed after the one before.
    fn fields(&self) -> impl Iterator<Item = Field> + '_ {
        let head = self.head();
        let mut end = head.len();
        let mut at = self.reason_at().saturating_add(self.reason_span());
        (0..self.count).map_while(move |_| {
            let (f, before) = Field::decode_back(head, end, at)?;
            end = before;
            at = at.saturating_add(f.text_len());
            Some(f)
        })
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Whether a tag header or a targeted cache-control field is among the fields.
    pub fn strippable(&self) -> bool {
        self.flags & STRIPPABLE != 0
    }

    /// Whether a `Content-Length` field is among the fields (`has("content-length")`,
    /// without a search).
    pub fn has_length(&self) -> bool {
        self.flags & LENGTH != 0
    }

    /// Whether a `Vary` field is among the fields (`has("vary")`, without a search).
    pub fn has_vary(&self) -> bool {
        self.flags & VARY != 0
    }

    /// Approximate bytes held: the URL, the reason phrase, names and values, the offsets,
    /// and the buffer's counts.
    pub fn bytes(&self) -> usize {
        if self.head().is_empty() {
            return 0;
        }
        self.head().len() + BUFFER_COUNTS
    }

    /// Where `f`'s name and value lie in the buffer.
    fn ranges(f: &Field) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let at = f.at as usize;
        let value = at + usize::from(f.name_len);
        (at..value, value..value + f.value_len as usize)
    }

    /// `f`'s name: a known one from [`KNOWN`], another from the buffer (no check of the
    /// bytes: they were a valid name when stored).
    fn name(&self, f: &Field) -> &str {
        match f.known.checked_sub(1) {
            Some(i) => KNOWN_NAMES.get(usize::from(i)).copied().unwrap_or_default(),
            None => std::str::from_utf8(self.head().get(Self::ranges(f).0).unwrap_or_default())
                .unwrap_or_default(),
        }
    }

    fn value(&self, f: &Field) -> &[u8] {
        self.head().get(Self::ranges(f).1).unwrap_or_default()
    }

    /// The head as Pingora's header, every field in order.
    pub fn to_response(&self) -> ResponseHeader {
        // room for what a hit adds: Age, Cache-Status, Date, Connection
        let mut h = self.response(self.map(4, |_| true));
        h.set_version(self.version);
        h
    }

    /// The fields `keep` accepts (it is given each lower-case name), as a header map with
    /// room for `extra` more (so that adding them does not grow it). The values are shared
    /// with the stored ones.
    pub fn map(&self, extra: usize, keep: impl Fn(&str) -> bool) -> HeaderMap {
        self.map_in(&self.shared(), extra, keep)
    }

    /// [`Self::map`], its values sliced from `shared`, this head's buffer ([`Self::shared`]).
    pub fn map_in(&self, shared: &Bytes, extra: usize, keep: impl Fn(&str) -> bool) -> HeaderMap {
        let shared = self.mine(shared);
        let mut map = HeaderMap::with_capacity(self.count as usize + extra);
        let start = self.start as usize;
        let len = self.head().len();
        for f in self.fields() {
            let name = self.name(&f);
            let value = Self::ranges(&f).1;
            if !keep(name) || value.end > len {
                continue;
            }
            let value = start + value.start..start + value.end;
            let name = match f.known.checked_sub(1).and_then(|i| KNOWN.get(usize::from(i))) {
                Some(known) => Ok(known.clone()),
                None => HeaderName::from_bytes(name.as_bytes()),
            };
            // both were a valid name and value when stored
            let (Ok(name), Ok(mut value)) = (name, HeaderValue::from_maybe_shared(shared.slice(value)))
            else {
                continue;
            };
            value.set_sensitive(f.sensitive);
            // far below the map's limit: the head was parsed into one
            let _ = map.try_append(name, value);
        }
        map
    }

    /// The fields `keep` keeps, name and value, in order: those [`Self::map_in`] puts in its
    /// map, for a writer that serialises them without one (the front's hits). Without its
    /// checks of each name and value: every stored head was a `ResponseHeader`'s
    /// ([`Self::for_entry`]), whose values hold no CR, LF or NUL (httparse, Pingora's and
    /// h2's checks, and pingora-header-serde's for a copy from memcached).
    pub fn each_field<'a>(&'a self, keep: impl Fn(&str) -> bool, mut each: impl FnMut(&'a str, &'a [u8])) {
        let head = self.head();
        for f in self.fields() {
            let name = self.name(&f);
            if !keep(name) {
                continue;
            }
            if let Some(value) = head.get(Self::ranges(&f).1) {
                debug_assert!(!value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)));
                each(name, value);
            }
        }
    }

    /// The reason phrase the status line had, if it was not the status's usual one.
    pub fn reason_phrase(&self) -> Option<&str> {
        self.reason()
    }

    /// This head's status line around `fields`, as Pingora's header. Without Pingora's
    /// case-preserving name map: names go out lower-case.
    pub fn response(&self, fields: HeaderMap) -> ResponseHeader {
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = self.status;
        parts.headers = fields;
        let mut h = ResponseHeader::from(parts);
        if let Some(reason) = self.reason() {
            let _ = h.set_reason_phrase(Some(reason));
        }
        h
    }
}

impl Fields for StoredHeader {
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = Value<'a>> + 'a {
        // a known name is compared as its number: a field of another name never has one
        let known = Field::known_text(name);
        self.fields()
            .filter(move |f| match known {
                0 => f.known == 0 && self.name(f).eq_ignore_ascii_case(name),
                k => f.known == k,
            })
            .map(|f| Value(self.value(&f)))
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.fields().map(|f| self.name(&f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::origins::MAX_ORIGIN_LEN;

    fn origin_head() -> ResponseHeader {
        let mut h = ResponseHeader::build(203, None).unwrap();
        h.append_header("Content-Type", "text/html").unwrap();
        h.append_header("X-Custom", "a").unwrap();
        h.append_header("Set-Cookie", "b=1").unwrap();
        h.append_header("Set-Cookie", "c=2").unwrap();
        h.append_header("Cache-Control", "max-age=60").unwrap();
        h.set_reason_phrase(Some("Partly")).unwrap();
        h
    }

    #[test]
    fn a_stored_head_rebuilds_the_same_fields_in_order() {
        let h = origin_head();
        let s = StoredHeader::new(&h);
        let back = s.to_response();
        assert_eq!(back.status, h.status);
        assert_eq!(back.get_reason_phrase(), Some("Partly"));
        let fields = |h: &ResponseHeader| {
            h.headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap().to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(fields(&back), fields(&h));
        // the URL and the reason phrase share the buffer
        let with = StoredHeader::with_url(&h, "http://h/p");
        assert_eq!((&*with.url(), with.reason()), ("http://h/p", Some("Partly")));
        assert_eq!(fields(&with.to_response()), fields(&h));
        assert_eq!(with.to_response().get_reason_phrase(), Some("Partly"));
        assert_eq!(s.all("set-cookie").count(), 2);
        assert_eq!(s.first("SET-COOKIE").unwrap(), "b=1");
        assert!(s.has("x-custom") && !s.has("vary"));
        assert_eq!(s.has_length(), s.has("content-length"));
        assert_eq!(s.has_vary(), s.has("vary"));
        let mut varies = h.clone();
        varies.append_header("Vary", "Accept-Encoding").unwrap();
        let varies = StoredHeader::with_url(&varies, "http://h/p");
        assert!(varies.has_vary() && !varies.has_length());
        assert!(varies.pack(&[Bytes::from_static(b"hello")]).0.has_vary());
        let mut framed = h.clone();
        framed.insert_header("Content-Length", "5").unwrap();
        let framed = StoredHeader::with_url(&framed, "http://h/p");
        assert!(framed.has_length() && framed.has("content-length"));
        // packed after a body, the same
        assert!(framed.pack(&[Bytes::from_static(b"hello")]).0.has_length());
        assert!(!s.strippable());
        let mut tagged = h.clone();
        tagged.append_header("xkey", "a").unwrap();
        assert!(StoredHeader::new(&tagged).strippable());
        let mut targeted = h;
        targeted.append_header("CDN-Cache-Control", "max-age=5").unwrap();
        assert!(StoredHeader::new(&targeted).strippable());
    }

    #[test]
    fn names_and_values_share_one_buffer_not_the_parsed_one() {
        // as Pingora hands them over: slices of the connection's read buffer
        let read = Bytes::from(vec![b'v'; 4096]);
        let mut h = ResponseHeader::build(200, None).unwrap();
        for (i, name) in ["content-type", "x-one", "x-two", "etag"].into_iter().enumerate() {
            let value = HeaderValue::from_maybe_shared(read.slice(i * 100..i * 100 + 10 + i)).unwrap();
            h.append_header(name, value).unwrap();
        }
        let inside = |p: *const u8| read.as_ptr_range().contains(&p);
        assert!(h.headers.values().all(|v| inside(v.as_bytes().as_ptr())));
        let s = StoredHeader::new(&h);
        let with = StoredHeader::with_url(&h, "http://a.example/p?q");
        drop(h);
        // none in the read buffer: one buffer of their own, names and values in order (a name
        // the http crate knows is not there), then 3 or 4 bytes of lengths per field (against
        // 72 for a (name, value) pair)
        assert!(!inside(s.buf.as_ptr()));
        let text = "x-onex-two".len() + 10 + 11 + 12 + 13;
        // content-type and etag known (3 bytes each), x-one and x-two not (4)
        let table = 3 + 4 + 4 + 3;
        assert_eq!(s.buf.len(), text + table);
        assert_eq!(s.first("x-two").unwrap().as_bytes().len(), 12);
        // a hit's values are slices of that buffer, not copies
        let map = s.map(0, |_| true);
        let held = s.buf.as_ptr_range();
        assert!(map.values().all(|v| held.contains(&v.as_bytes().as_ptr())));
        assert_eq!(s.bytes(), text + table + BUFFER_COUNTS);
        // with the entry's URL in front, in the same buffer
        // (its origin as its number: 2 bytes)
        assert_eq!(with.url(), "http://a.example/p?q");
        assert_eq!(with.url_parts(), ("http://a.example", "/p?q"));
        assert_eq!(with.bytes(), s.bytes() + 2 + "/p?q".len());
        assert_eq!(with.names().collect::<Vec<_>>(), s.names().collect::<Vec<_>>());
        assert_eq!(with.first("etag").unwrap().as_bytes().len(), 13);
        assert_eq!(s.url(), "");
    }

    /// A URL's origin is kept as its number when it has one, and the URL whole otherwise; the
    /// URL, its host and path, the variance, the epoch and the reason read the same either
    /// way.
    #[test]
    fn a_head_keeps_its_url_s_origin_as_a_number_or_the_url_whole() {
        use std::time::{Duration, SystemTime};
        let h = origin_head();
        let v = [7u8; 16];
        let epoch = Nanos::of(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let long = format!("http://{}.example", "l".repeat(MAX_ORIGIN_LEN));
        for (url, numbered) in [
            ("http://origin.example:8080/a/b?c=d", true),
            ("http://origin.example:8080/", true),
            (&format!("{long}/p")[..], false),
            ("http://no-path.example", false),
            ("http://no-path.example?q=1", false),
            ("", false),
        ] {
            let s = StoredHeader::for_entry(&h, url, Some(v), Some(epoch));
            let whole = StoredHeader::for_entry(&h, "", Some(v), Some(epoch));
            assert_eq!(s.url(), url);
            assert_eq!(s.host_and_path(), super::super::split_url(url), "{url}");
            let kept = if numbered {
                2 + split_origin(url).expect("an origin").1.len()
            } else {
                url.len()
            };
            assert_eq!(s.bytes(), whole.bytes() + kept, "{url}");
            assert_eq!(s.url_parts().0.is_empty(), !numbered, "{url}");
            assert_eq!((s.variance(), s.epoch_override()), (Some(v), Some(epoch)));
            assert_eq!(s.reason(), Some("Partly"));
            let (packed, _) = s.pack(&[Bytes::from_static(b"body")]);
            assert_eq!(
                (packed.url(), packed.host_and_path()),
                (s.url(), s.host_and_path())
            );
        }
        // one number per origin, whatever the path
        let a = StoredHeader::with_url(&h, "http://same.example/a");
        let b = StoredHeader::with_url(&h, "http://same.example/b?q");
        assert_eq!(a.head()[..2], b.head()[..2]);
        assert_eq!(
            (a.url_parts(), b.url_parts().1),
            (("http://same.example", "/a"), "/b?q")
        );
    }

    proptest::proptest! {
        /// Whatever the URL, a head gives it back as it was given, and its host and path as
        /// `split_url` cuts them (what bans match). Few hosts: the numbers are the process's.
        #[test]
        fn a_head_gives_its_url_back_as_given(
            scheme in "(http|x)?(://)?",
            host in "[ab]{0,2}",
            // (no `:`: a `://` in the rest would be another origin each time)
            rest in "[/?a-z%]{0,12}",
        ) {
            let url = format!("{scheme}{host}{rest}");
            let s = StoredHeader::with_url(&origin_head(), &url);
            proptest::prop_assert_eq!(&*s.url(), url.as_str());
            proptest::prop_assert_eq!(s.host_and_path(), super::super::split_url(&url));
            let (origin, after) = s.url_parts();
            proptest::prop_assert_eq!(format!("{origin}{after}"), url.clone());
            let whole = StoredHeader::with_url(&origin_head(), "").bytes() + url.len();
            proptest::prop_assert!(origin.is_empty() || s.bytes() < whole);
        }
    }

    #[test]
    fn a_head_packed_with_a_body_is_the_same_head_after_it() {
        let h = origin_head();
        let alone = StoredHeader::with_url(&h, "http://h/p");
        let chunks = [Bytes::from_static(b"bo"), Bytes::from_static(b"dy")];
        let (packed, apart) = alone.pack(&chunks);
        assert!(apart.is_none());
        let body = packed.body();
        assert_eq!((&body[..], packed.body_len()), (&b"body"[..], 4));
        // one buffer: the body, then the head
        assert_eq!(packed.buf.as_ptr(), body.as_ptr());
        assert_eq!(packed.head().as_ptr() as usize, body.as_ptr() as usize + 4);
        assert_eq!(&packed.body_slice(1..3)[..], b"od");
        assert_eq!(&packed.body_slice(2..99)[..], b"dy", "clamped to the body");
        assert_eq!((&*packed.url(), packed.reason()), ("http://h/p", Some("Partly")));
        assert_eq!(packed.bytes(), alone.bytes());
        let fields = |s: &StoredHeader| {
            s.fields()
                .map(|f| (s.name(&f).to_owned(), s.value(&f).to_vec()))
                .collect::<Vec<_>>()
        };
        assert_eq!(fields(&packed), fields(&alone));
        assert!(packed.same(&packed.clone()) && !packed.same(&alone));
        // nothing to pack: empty, no allocation kept
        let (empty, none) = StoredHeader::new(&ResponseHeader::build(304, None).unwrap()).pack(&[]);
        assert_eq!((empty.bytes(), empty.body_len(), none.is_none()), (0, 0, true));
        // a head of its own has no body
        assert_eq!(alone.body_len(), 0);
        assert!(alone.body().is_empty());
        // a body too large to pack (4 GiB in `pack`) comes back apart, whole, and the head
        // stays a head of its own, the same
        let (head, apart) = alone.pack_below(&chunks, 4);
        assert_eq!(apart.as_deref(), Some(&b"body"[..]));
        assert!(head.same(&alone) && head.body_len() == 0);
        assert_eq!(fields(&head), fields(&alone));
        let (head, apart) = alone.pack_below(&chunks, 5);
        assert!(apart.is_none() && &head.body()[..] == b"body");
    }

    #[test]
    fn a_hit_slices_its_values_and_body_from_one_share_of_the_buffer() {
        let (packed, _) =
            StoredHeader::with_url(&origin_head(), "http://h/p").pack(&[Bytes::from_static(b"body")]);
        let shared = packed.shared();
        let whole = shared.as_ptr_range();
        let values = |m: &HeaderMap| m.values().map(|v| v.as_bytes().to_vec()).collect::<Vec<_>>();
        let map = packed.map_in(&shared, 0, |_| true);
        assert!(map.values().all(|v| whole.contains(&v.as_bytes().as_ptr())));
        let body = packed.body_in(&shared);
        assert_eq!((&body[..], body.as_ptr()), (&b"body"[..], shared.as_ptr()));
        // another head's buffer is not taken for this one's, nor a part of its own
        let part = shared.slice(..2);
        assert_eq!(&packed.body_in(&part)[..], b"body");
        assert_eq!(values(&packed.map_in(&part, 0, |_| true)), values(&map));
        let other = StoredHeader::with_url(&origin_head(), "http://h/other").shared();
        assert_eq!(&packed.body_in(&other)[..], b"body");
        assert_eq!(values(&packed.map_in(&other, 0, |_| true)), values(&map));
        // an empty buffer is shared, not allocated
        let empty = StoredHeader::new(&ResponseHeader::build(304, None).unwrap());
        assert!(Arc::ptr_eq(empty.buffer(), &EMPTY) && empty.buffer().is_empty());
    }

    #[test]
    fn sensitive_values_stay_sensitive_and_an_empty_head_is_empty() {
        let mut h = ResponseHeader::build(204, None).unwrap();
        let mut secret = HeaderValue::from_static("token");
        secret.set_sensitive(true);
        h.append_header("x-secret", secret).unwrap();
        h.append_header("x-plain", "text").unwrap();
        let s = StoredHeader::new(&h);
        let back = s.to_response();
        assert!(back.headers["x-secret"].is_sensitive());
        assert!(!back.headers["x-plain"].is_sensitive());
        let empty = StoredHeader::new(&ResponseHeader::build(304, None).unwrap());
        assert_eq!((empty.names().count(), empty.bytes()), (0, 0));
        assert_eq!(empty.to_response().status, 304);
    }

    /// The table's three forms (a known name, another name, and the wide one for a value of
    /// 64 KiB or more or a name over 255 bytes) read back in order, with their sensitivity,
    /// after a reason phrase and packed after a body.
    #[test]
    fn each_form_of_a_field_s_lengths_reads_back_in_order() {
        let long_value = "v".repeat(70_000);
        let long_name = format!("x-{}", "n".repeat(300));
        let mut h = ResponseHeader::build(200, None).unwrap();
        let _ = h.set_reason_phrase(Some("Fine"));
        h.append_header("etag", "\"e\"").unwrap();
        h.append_header("x-custom", "c").unwrap();
        h.append_header("content-type", long_value.as_str()).unwrap();
        h.append_header(long_name.clone(), "n").unwrap();
        let mut secret = HeaderValue::from_static("s");
        secret.set_sensitive(true);
        h.append_header("x-secret", secret).unwrap();
        h.append_header("etag", "\"f\"").unwrap();
        let text = 3 + 8 + 1 + 70_000 + long_name.len() + 1 + 8 + 1 + 3;
        let table = 3 + 4 + 7 + 7 + 4 + 3;
        let s = StoredHeader::new(&h);
        assert_eq!(s.bytes(), 2 + "Fine".len() + text + table + BUFFER_COUNTS);
        let (packed, _) = s.pack(&[Bytes::from_static(b"body")]);
        for s in [&s, &packed] {
            assert_eq!(fields_of(&s.to_response()), fields_of(&h));
            let map = s.map(0, |_| true);
            assert!(map["x-secret"].is_sensitive() && !map["x-custom"].is_sensitive());
            assert_eq!(s.reason(), Some("Fine"));
        }
    }

    /// The short form holds a value of up to 65,535 bytes and a name of up to 255; one more
    /// takes the wide form, and each reads back whole.
    #[test]
    fn a_field_s_lengths_take_the_wide_form_from_64_kib_and_256_byte_names() {
        let cases = [
            ("etag".to_string(), 65_535, 3),
            ("etag".to_string(), 65_536, 7),
            (format!("x-{}", "n".repeat(253)), 1, 4),
            (format!("x-{}", "n".repeat(254)), 1, 7),
            (format!("x-{}", "n".repeat(253)), 65_536, 7),
        ];
        for (name, value_len, table) in cases {
            let mut h = ResponseHeader::build(200, None).unwrap();
            h.append_header(name.clone(), "v".repeat(value_len)).unwrap();
            h.append_header("etag", "\"after\"").unwrap();
            let s = StoredHeader::new(&h);
            let text = if Field::known_text(&name) > 0 {
                0
            } else {
                name.len()
            } + value_len;
            let after = "\"after\"".len() + 3;
            assert_eq!(
                s.bytes(),
                text + table + after + BUFFER_COUNTS,
                "{} {value_len}",
                name.len()
            );
            assert_eq!(
                fields_of(&s.to_response()),
                fields_of(&h),
                "{} {value_len}",
                name.len()
            );
        }
    }

    #[test]
    fn a_head_is_charged_for_its_text_and_offsets() {
        let mut known = ResponseHeader::build(200, None).unwrap();
        known.append_header("etag", "\"abcd\"").unwrap();
        let mut custom = ResponseHeader::build(200, None).unwrap();
        custom.append_header("X-Et", "\"abcd\"").unwrap();
        let (k, c) = (
            StoredHeader::new(&known).bytes(),
            StoredHeader::new(&custom).bytes(),
        );
        // a name the http crate knows is a number in the table, another one text and its
        // length (a byte)
        assert_eq!(k, 6 + 3 + BUFFER_COUNTS);
        assert_eq!(c, k + 4 + 1);
        let s = StoredHeader::new(&custom);
        assert_eq!(s.names().collect::<Vec<_>>(), ["x-et"]);
        assert_eq!(StoredHeader::new(&known).names().collect::<Vec<_>>(), ["etag"]);
    }

    fn fields_of(h: &ResponseHeader) -> Vec<(String, String)> {
        h.headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap().to_string()))
            .collect()
    }

    #[test]
    fn a_head_keeps_its_entry_s_variance_between_the_url_and_the_reason() {
        let h = origin_head();
        let v = [9u8; 16];
        let s = StoredHeader::for_entry(&h, "http://h/v", Some(v), None);
        let plain = StoredHeader::with_url(&h, "http://h/v");
        assert_eq!((s.variance(), plain.variance()), (Some(v), None));
        assert_eq!((&*s.url(), s.reason()), ("http://h/v", Some("Partly")));
        assert_eq!(fields_of(&s.to_response()), fields_of(&h));
        assert_eq!(s.bytes(), plain.bytes() + 16);
        // packed after a body, the same
        let (packed, _) = s.pack(&[Bytes::from_static(b"body")]);
        assert_eq!(&packed.body()[..], b"body");
        assert_eq!((packed.variance(), packed.reason()), (Some(v), Some("Partly")));
        assert_eq!(fields_of(&packed.to_response()), fields_of(&h));
    }

    /// What `Age` counts from, when the origin sent one, is kept after the variance (8
    /// bytes, only then), and the reason phrase and the fields are read from after it.
    #[test]
    fn a_head_keeps_the_epoch_of_its_age_after_the_variance() {
        use std::time::{Duration, SystemTime};
        let h = origin_head();
        let v = [7u8; 16];
        let epoch = Nanos::of(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789));
        for variance in [None, Some(v)] {
            let s = StoredHeader::for_entry(&h, "http://h/e", variance, Some(epoch));
            let without = StoredHeader::for_entry(&h, "http://h/e", variance, None);
            assert_eq!(
                (s.epoch_override(), without.epoch_override()),
                (Some(epoch), None)
            );
            assert_eq!((s.variance(), &*s.url()), (variance, "http://h/e"));
            assert_eq!(s.reason(), Some("Partly"));
            assert_eq!(fields_of(&s.to_response()), fields_of(&h));
            assert_eq!(s.bytes(), without.bytes() + EPOCH_LEN);
            let (packed, _) = s.pack(&[Bytes::from_static(b"body")]);
            assert_eq!(
                (packed.epoch_override(), packed.variance()),
                (Some(epoch), variance)
            );
            assert_eq!(packed.reason(), Some("Partly"));
            assert_eq!(fields_of(&packed.to_response()), fields_of(&h));
        }
    }

    /// A reason phrase is kept only when it is not the status's canonical one, with its
    /// length (an empty one too); the fields after it are read from their place.
    #[test]
    fn a_reason_phrase_is_kept_only_when_it_is_not_the_canonical_one() {
        let with = |reason: Option<&str>| {
            let mut h = ResponseHeader::build(200, None).unwrap();
            h.set_reason_phrase(reason).unwrap();
            h.append_header("x-after", "v").unwrap();
            h.append_header("etag", "\"e\"").unwrap();
            StoredHeader::with_url(&h, "http://h/r")
        };
        let canonical = with(None);
        let same = with(Some("OK"));
        let empty = with(Some(""));
        let odd = with(Some("Fine Thanks"));
        assert_eq!(canonical.reason(), None);
        assert_eq!(same.reason(), None);
        assert_eq!(
            same.bytes(),
            canonical.bytes(),
            "a canonical reason costs nothing"
        );
        assert_eq!(empty.reason(), Some(""));
        assert_eq!(empty.bytes(), canonical.bytes() + 2);
        assert_eq!(odd.reason(), Some("Fine Thanks"));
        assert_eq!(odd.bytes(), canonical.bytes() + 2 + 11);
        for s in [&canonical, &empty, &odd] {
            assert_eq!(s.url(), "http://h/r");
            assert_eq!(s.first("x-after").unwrap().as_bytes(), b"v");
            assert_eq!(s.first("etag").unwrap().as_bytes(), b"\"e\"");
            let (packed, _) = s.pack(&[Bytes::from_static(b"b")]);
            assert_eq!(packed.reason(), s.reason());
            assert_eq!(
                packed.to_response().get_reason_phrase(),
                s.to_response().get_reason_phrase()
            );
            assert_eq!(packed.first("etag").unwrap().as_bytes(), b"\"e\"");
        }
        assert_eq!(odd.to_response().get_reason_phrase(), Some("Fine Thanks"));
    }

    #[test]
    fn a_standard_name_not_known_here_is_kept_as_text() {
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.append_header("Access-Control-Allow-Credentials", "true")
            .unwrap();
        h.append_header("etag", "\"x\"").unwrap();
        let s = StoredHeader::new(&h);
        assert_eq!(s.first("access-control-allow-credentials").unwrap(), "true");
        assert_eq!(s.first("ETag").unwrap(), "\"x\"");
        let map = s.map(0, |_| true);
        assert_eq!(
            map.keys().next(),
            Some(&http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS)
        );
        assert_eq!(fields_of(&s.to_response()), fields_of(&h));
        let text = "access-control-allow-credentials".len() + "true".len() + "\"x\"".len();
        assert_eq!(s.bytes(), text + 4 + 3 + BUFFER_COUNTS);
    }

    #[test]
    fn known_names_as_text_are_the_known_names() {
        for (name, text) in KNOWN.iter().zip(KNOWN_NAMES) {
            assert_eq!(name.as_str(), text);
        }
        // a known name is looked up in any case, and by its number
        let s = StoredHeader::new(&origin_head());
        assert_eq!(s.first("Content-TYPE").unwrap(), "text/html");
        assert_eq!(s.first("X-CUSTOM").unwrap(), "a");
        assert!(s.first("x-cust").is_none() && s.first("content").is_none());
    }

    #[test]
    fn build_filters_and_leaves_room() {
        let s = StoredHeader::new(&origin_head());
        let map = s.map(2, |n| n != "set-cookie");
        assert!(!map.contains_key("set-cookie"));
        assert_eq!(map.len(), 3);
        let h = s.response(map);
        assert_eq!((h.status.as_u16(), h.get_reason_phrase()), (203, Some("Partly")));
        let canonical = StoredHeader::new(&ResponseHeader::build(200, None).unwrap());
        assert!(canonical.reason().is_none());
        assert_eq!(canonical.to_response().get_reason_phrase(), Some("OK"));
    }
}
