//! What L1 holds, a page at a time (admin `GET /keys`).
//!
//! Entries are listed in the order of their keys (primary hash, then variance), so a page
//! starts after the last key of the previous one (the cursor) whatever was added or removed
//! in between: an entry present through the whole walk is listed exactly once. A page holds
//! the table's shard locks one at a time, for reading, and keeps at most `limit` + 1 entries
//! (a bounded heap): its memory is O(limit), its time one pass over the table.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use pingora_cache::key::HashBinary;

use super::{MemoryStorage, Stored};

/// Where a page starts: after this key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    primary: HashBinary,
    /// `None` (the primary slot) sorts first.
    variance: Option<HashBinary>,
}

impl Cursor {
    /// `<32 hex>` or `<32 hex>.<32 hex>`, as [`Cursor::parse`] reads it.
    pub fn text(&self) -> String {
        let mut s = hex(&self.primary);
        if let Some(v) = &self.variance {
            s.push('.');
            s.push_str(&hex(v));
        }
        s
    }

    pub fn parse(text: &str) -> Option<Cursor> {
        let (primary, variance) = match text.split_once('.') {
            Some((p, v)) => (p, Some(v)),
            None => (text, None),
        };
        Some(Cursor {
            primary: unhex(primary)?,
            variance: match variance {
                Some(v) => Some(unhex(v)?),
                None => None,
            },
        })
    }
}

fn hex(b: &HashBinary) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<HashBinary> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// One entry as `/keys` shows it.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    /// `http://host/path?q`.
    pub url: Arc<str>,
    /// The variant's hash (hex), `None` for a response without variants.
    pub variant: Option<String>,
    /// What the entry is charged in the memory budget.
    pub bytes: usize,
    /// Since it was fetched or last revalidated (the `Age` a hit would carry).
    pub epoch: SystemTime,
    pub fresh_until: SystemTime,
    pub hits: u32,
    /// Its tags (`xkey`, `Surrogate-Key`, ... values).
    pub tags: Vec<String>,
}

/// A page of [`MemoryStorage::list`].
#[derive(Debug, Default)]
pub struct Listed {
    pub keys: Vec<KeyInfo>,
    /// Where the next page starts; `None` when this one was the last.
    pub next: Option<Cursor>,
}

/// Heap item ordered by cursor only (a max-heap: the largest kept key is dropped first).
struct ByKey(Cursor, Arc<Stored>);

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for ByKey {}
impl PartialOrd for ByKey {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for ByKey {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.0.cmp(&other.0)
    }
}

impl MemoryStorage {
    /// Up to `limit` committed entries whose URL's host and path ([`super::split_url`]) pass
    /// `wanted`, in key order, after `after`. The URL is put together only for the page.
    pub fn list(&self, after: Option<Cursor>, limit: usize, wanted: impl Fn(&str, &str) -> bool) -> Listed {
        let limit = limit.max(1);
        let generation = self.generation.load(Ordering::Acquire);
        let mut heap: BinaryHeap<ByKey> = BinaryHeap::with_capacity(limit + 2);
        for row in self.table.iter() {
            for (variance, slot) in row.value().iter() {
                let Some(entry) = &slot.entry else { continue };
                let key = Cursor {
                    primary: *row.key(),
                    variance: variance.or(entry.meta.variance()),
                };
                if after.is_some_and(|a| key <= a)
                    || !entry.of_generation(generation)
                    || heap.len() > limit && heap.peek().is_some_and(|top| key >= top.0)
                    || !{
                        let (host, path) = entry.meta.header.host_and_path();
                        wanted(&host, path)
                    }
                {
                    continue;
                }
                heap.push(ByKey(key, entry.clone()));
                if heap.len() > limit + 1 {
                    heap.pop();
                }
            }
        }
        let mut page = heap.into_sorted_vec();
        let more = page.len() > limit;
        page.truncate(limit);
        let next = more.then(|| page.last().map(|k| k.0)).flatten();
        let keys = page
            .into_iter()
            .map(|ByKey(key, e)| KeyInfo {
                url: Arc::from(&*e.url()),
                variant: key.variance.as_ref().map(hex),
                bytes: e.weight(),
                epoch: e.meta.epoch().get(),
                fresh_until: e.meta.fresh_until.get(),
                hits: e.hits.load(Ordering::Relaxed),
                tags: tags_of(&e.meta.header),
            })
            .collect();
        Listed { keys, next }
    }
}

fn tags_of(headers: &impl crate::fields::Fields) -> Vec<String> {
    let mut tags = Vec::new();
    for (name, sep) in crate::purge::TAG_HEADERS {
        for value in headers.all(name).filter_map(crate::fields::Value::text) {
            tags.extend(crate::purge::split_tags(value, sep));
        }
    }
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_back_and_refuse_garbage() {
        let c = Cursor {
            primary: [7; 16],
            variance: Some([0xab; 16]),
        };
        assert_eq!(Cursor::parse(&c.text()), Some(c));
        let p = Cursor {
            primary: [1; 16],
            variance: None,
        };
        assert_eq!(Cursor::parse(&p.text()), Some(p));
        assert!(p < c);
        for bad in ["", "zz", "abc", &"g".repeat(32), &format!("{}.", "a".repeat(32))] {
            assert_eq!(Cursor::parse(bad), None, "{bad:?}");
        }
    }
}
