//! The fast hit path: plain requests for fresh, variant-free L1 entries answered in the
//! request filter, without Pingora's cache state machine.

use std::time::SystemTime;

use http::{header, Method};
use pingora_cache::eviction::EvictionManager;
use pingora_cache::key::{CompactCacheKey, HashBinary};
use pingora_error::Result;
use pingora_proxy::Session;

use super::answer::age_value;
use super::headers::wire_fields;
use super::{cache_status_value, Corral, Ctx, CACHE_STATUS};
use crate::cache_status::{CacheStatus, Outcome};
use crate::key;
use crate::metrics;
use crate::purge::Verdict;
use crate::storage::memory::FreshEntry;

impl Corral {
    /// The fast hit path: a plain GET/HEAD (no conditionals, no range, no request directives)
    /// for a fresh, complete, variant-free L1 entry that no ban or tag purge touches is answered
    /// here, from the stored header and body, without Pingora's cache state machine (lookup
    /// boxing, a second header copy, range and conditional filters). Everything else, and
    /// every doubt, returns `false` and takes the full path, which decides the same way.
    /// Returns whether the response was sent.
    pub(super) async fn fast_hit(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if ctx.conditional || !ctx.directives.is_plain() || ctx.key_headers.is_some() {
            return Ok(false);
        }
        let head = session.req_header().method == Method::HEAD;
        // the hash alone: the key's own copy of its text is built only for the full path
        let hash = key::primary_hash(&ctx.host, &ctx.path);
        // the request's arrival, read a moment ago (`new_ctx`, after its head was read): the
        // time a response is judged fresh at (RFC 9111 §4.2), one clock read fewer per hit
        let now = ctx.arrived;
        let Some(entry) = self.fast_entry(&hash, ctx, now) else {
            ctx.key = Some(key::for_parts_hashed(&ctx.host, &ctx.path, hash));
            return Ok(false);
        };
        // a hit keeps the entry in the LRU, as Pingora's hit path does
        let compact = CompactCacheKey {
            primary: hash,
            variance: None,
            user_tag: Box::default(),
        };
        let lru_key = pingora_cache::eviction::CacheEntryKey::from_entry_id(compact, None);
        self.parts
            .eviction
            .access(&lru_key, entry.weight(), entry.fresh_until());

        let (strip, targeted) = (
            ctx.live.cfg.purge.strip_tag_headers,
            ctx.live.cfg.cache.strip_targeted,
        );
        // one share of the entry's buffer (one allocation) for the values and the body
        let shared = entry.header().shared();
        let mut fields = wire_fields(entry.header(), &shared, strip, targeted);
        let age = now.duration_since(entry.epoch()).unwrap_or_default().as_secs();
        fields.insert(header::AGE, age_value(age));
        let mut status = CacheStatus::new(Outcome::Hit);
        status.ttl = Some(
            entry
                .fresh_until()
                .duration_since(now)
                .map_or(0, |d| d.as_secs() as i64),
        );
        fields.insert(CACHE_STATUS, cache_status_value(&status)?);
        let mut resp = entry.header().response(fields);
        resp.set_version(http::Version::HTTP_11);
        ctx.status = Some(status);
        metrics::FAST_HITS.inc();
        session.write_response_header(Box::new(resp), head).await?;
        if !head {
            session
                .write_response_body(Some(entry.body_in(&shared)), true)
                .await?;
        }
        Ok(true)
    }

    /// The L1 entry the fast hit path may serve for the URL whose primary key hashes to
    /// `primary`: fresh, plain (see
    /// [`crate::storage::memory::MemoryStorage::fresh_plain`]), framed by `Content-Length` (Pingora frames the others),
    /// and valid against every purge record. Otherwise `None`: the full path then decides,
    /// and applies a purge verdict (a miss, or stale while one request revalidates).
    fn fast_entry(&self, primary: &HashBinary, ctx: &Ctx, now: SystemTime) -> Option<FreshEntry> {
        let entry = self.parts.storage.l1.fresh_plain(primary, now)?;
        if !entry.header().has_length() {
            return None;
        }
        if self
            .parts
            .storage
            .log
            .fenced(entry.updated(), entry.validated_by(), now)
        {
            // fenced: the full path revalidates it
            return None;
        }
        let headers = entry.header();
        let verdict = self.parts.validity.check_marked(
            &ctx.host,
            &ctx.path,
            entry.updated(),
            entry.validated_by(),
            headers,
            Some(entry.check_mark()),
        );
        (verdict == Verdict::Valid).then_some(entry)
    }
}
