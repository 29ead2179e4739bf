use pingora_cache::storage::{HitHandler, MissFinishType, PurgeOutcome, PurgeTarget, PurgeType, Storage};
use pingora_error::Result;
use pingora_http::ResponseHeader;

use super::*;
use crate::purge::{Purge, Validity};
use once_cell::sync::Lazy;

fn meta(max_age: u64) -> CacheMeta {
    let mut h = ResponseHeader::build(200, None).unwrap();
    h.append_header("content-type", "text/plain").unwrap();
    let now = SystemTime::now();
    CacheMeta::new(now + Duration::from_secs(max_age), now, 0, 0, h)
}

/// The meta of a 304 that revalidated `old` for 60 s: Pingora carries the stored copy's
/// lineage (its provenance) over into it.
fn revalidated(old: &CacheMeta) -> CacheMeta {
    let mut h = ResponseHeader::build(200, None).unwrap();
    h.append_header("content-type", "text/plain").unwrap();
    let now = SystemTime::now();
    CacheMeta::new(now + Duration::from_secs(60), old.provenance(), 0, 0, h)
}

async fn fill(s: &'static MemoryStorage, key: &CacheKey, chunks: &[&'static str]) -> usize {
    let trace = pingora_cache::trace::Span::inactive().handle();
    let mut miss = s.get_miss_handler(key, &meta(60), &trace).await.unwrap();
    for (i, c) in chunks.iter().enumerate() {
        miss.write_body(Bytes::from_static(c.as_bytes()), i + 1 == chunks.len())
            .await
            .unwrap();
    }
    match miss.finish().await.unwrap() {
        MissFinishType::Created(w) => w,
        MissFinishType::Appended(..) => unreachable!(),
    }
}

async fn read_all(h: &mut HitHandler) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(b) = h.read_body().await? {
        out.extend_from_slice(&b);
    }
    Ok(out)
}

#[tokio::test]
async fn miss_then_hit_shares_the_body() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let key = CacheKey::new("http://h/a", "");
    let trace = pingora_cache::trace::Span::inactive().handle();
    assert!(S.lookup(&key, &trace).await.unwrap().is_none());
    let weight = fill(&S, &key, &["hel", "lo"]).await;
    assert_eq!(
        S.stats(),
        MemoryStats {
            entries: 1,
            bytes: weight
        }
    );
    let (m, mut h) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert!(m.is_fresh(SystemTime::now()));
    let body = h.read_body().await.unwrap().unwrap();
    assert_eq!(&body[..], b"hello");
    assert!(h.read_body().await.unwrap().is_none());
    let (_, mut h2) = S.lookup(&key, &trace).await.unwrap().unwrap();
    let body2 = h2.read_body().await.unwrap().unwrap();
    assert_eq!(body.as_ptr(), body2.as_ptr(), "two hits share one buffer");
}

/// A copy promoted from memcached keeps its body only: the body arrives as a slice of the
/// whole record, and holding it would hold the record's meta and header too, uncounted.
#[tokio::test]
async fn a_promoted_body_does_not_keep_its_record_alive() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let key = CacheKey::new("http://h/promoted", "");
    let trace = pingora_cache::trace::Span::inactive().handle();
    let record = Bytes::from(vec![b'r'; 4096]);
    let body = record.slice(4000..4096);
    let parts = MetaParts::from_meta(&meta(60), "http://h/promoted");
    assert!(S.insert(&key, parts, body, S.generation()).await.is_some());
    let (_, mut hit) = S.lookup(&key, &trace).await.unwrap().unwrap();
    let got = hit.read_body().await.unwrap().unwrap();
    assert_eq!(&got[..], &[b'r'; 96][..]);
    assert!(
        !record.as_ptr_range().contains(&got.as_ptr()),
        "a copy of its own"
    );
}

#[tokio::test]
async fn readers_stream_a_fill_in_progress() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let key = CacheKey::new("http://h/stream", "");
    let trace = pingora_cache::trace::Span::inactive().handle();
    let mut miss = S.get_miss_handler(&key, &meta(60), &trace).await.unwrap();
    miss.write_body(Bytes::from_static(b"one "), false).await.unwrap();
    let (_, mut reader) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert_eq!(&reader.read_body().await.unwrap().unwrap()[..], b"one ");
    let writer = tokio::spawn(async move {
        miss.write_body(Bytes::from_static(b"two"), true).await.unwrap();
        miss.finish().await.unwrap();
    });
    assert_eq!(&reader.read_body().await.unwrap().unwrap()[..], b"two");
    assert!(reader.read_body().await.unwrap().is_none());
    writer.await.unwrap();
    let (_, mut h) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert_eq!(read_all(&mut h).await.unwrap(), b"one two");
}

#[tokio::test]
async fn a_range_is_cut_from_a_fill_in_progress() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let key = CacheKey::new("http://h/ranged", "");
    let trace = pingora_cache::trace::Span::inactive().handle();
    let mut miss = S.get_miss_handler(&key, &meta(60), &trace).await.unwrap();
    miss.write_body(Bytes::from_static(b"abc"), false).await.unwrap();
    let (_, mut middle) = S.lookup(&key, &trace).await.unwrap().unwrap();
    let (_, mut tail) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert!(middle.can_seek());
    middle.seek(2, Some(6)).unwrap(); // bytes 2..6: "cdef"
    tail.seek(5, None).unwrap(); // from byte 5: "fgh"
    assert_eq!(&middle.read_body().await.unwrap().unwrap()[..], b"c");
    miss.write_body(Bytes::from_static(b"defg"), false).await.unwrap();
    assert_eq!(&middle.read_body().await.unwrap().unwrap()[..], b"def");
    assert!(middle.read_body().await.unwrap().is_none(), "ends with the range");
    assert_eq!(&tail.read_body().await.unwrap().unwrap()[..], b"fg");
    miss.write_body(Bytes::from_static(b"h"), true).await.unwrap();
    assert_eq!(&tail.read_body().await.unwrap().unwrap()[..], b"h");
    assert!(tail.read_body().await.unwrap().is_none());
    let (_, mut late) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert!(late.seek(8, None).is_err(), "past the end of a finished body");
    miss.finish().await.unwrap();
}

#[tokio::test]
async fn readers_learn_the_end_from_finish_alone() {
    // a chunked body whose last chunk arrives on its own: Pingora finishes the miss
    // without a write_body(.., eof = true)
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let key = CacheKey::new("http://h/chunked", "");
    let trace = pingora_cache::trace::Span::inactive().handle();
    let mut miss = S.get_miss_handler(&key, &meta(60), &trace).await.unwrap();
    miss.write_body(Bytes::from_static(b"body"), false).await.unwrap();
    let (_, mut reader) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert_eq!(&reader.read_body().await.unwrap().unwrap()[..], b"body");
    miss.finish().await.unwrap();
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), reader.read_body());
    assert!(end.await.expect("the reader learns the end").unwrap().is_none());
}

#[tokio::test]
async fn an_abandoned_fill_fails_its_readers_and_stores_nothing() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let key = CacheKey::new("http://h/abandoned", "");
    let trace = pingora_cache::trace::Span::inactive().handle();
    let mut miss = S.get_miss_handler(&key, &meta(60), &trace).await.unwrap();
    miss.write_body(Bytes::from_static(b"part"), false).await.unwrap();
    let (_, mut reader) = S.lookup(&key, &trace).await.unwrap().unwrap();
    drop(miss);
    assert!(read_all(&mut reader).await.is_err());
    assert!(S.lookup(&key, &trace).await.unwrap().is_none());
    assert_eq!(S.stats(), MemoryStats::default());
}

#[tokio::test]
async fn variants_are_separate_and_purged_together() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let trace = pingora_cache::trace::Span::inactive().handle();
    let mut gz = CacheKey::new("http://h/v", "");
    gz.set_variance_key([1; 16]);
    let mut br = CacheKey::new("http://h/v", "");
    br.set_variance_key([2; 16]);
    fill(&S, &gz, &["gz"]).await;
    fill(&S, &br, &["br"]).await;
    let (_, mut h) = S.lookup(&br, &trace).await.unwrap().unwrap();
    assert_eq!(read_all(&mut h).await.unwrap(), b"br");
    let removed = S.remove_primary(&gz.primary_bin());
    assert_eq!(removed.len(), 2);
    assert!(S.lookup(&gz, &trace).await.unwrap().is_none());
    assert!(S.lookup(&br, &trace).await.unwrap().is_none());
    assert_eq!(S.stats(), MemoryStats::default());
}

/// A URL's first variant sits in its primary slot with its variance (Pingora's way): the
/// variance, kept in the head's buffer, comes back on a hit, and after a soft purge, which
/// keeps the entry's weight; it is charged with the head.
#[tokio::test]
async fn a_primary_slot_keeps_its_variant_s_variance_through_a_soft_purge() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let trace = pingora_cache::trace::Span::inactive().handle();
    let key = CacheKey::new("http://h/varies", "");
    let mut varied = meta(60);
    varied.set_variance_key([5; 16]);
    let mut miss = S.get_miss_handler(&key, &varied, &trace).await.unwrap();
    miss.write_body(Bytes::from_static(b"gz"), true).await.unwrap();
    let MissFinishType::Created(weight) = miss.finish().await.unwrap() else {
        unreachable!()
    };
    let (m, _) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert_eq!(m.variance(), Some([5; 16]));
    let plain = {
        static P: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
        fill(&P, &key, &["gz"]).await
    };
    assert_eq!(weight, plain + 16, "the variance is charged");
    S.expire(PurgeTarget::Active(&key.to_compact()), &trace)
        .await
        .unwrap();
    let (m, _) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert!(!m.is_fresh(SystemTime::now()));
    assert_eq!(m.variance(), Some([5; 16]));
    assert_eq!(S.stats().bytes, weight, "a soft purge keeps the weight");
}

#[tokio::test]
async fn purge_expire_and_update_meta() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let trace = pingora_cache::trace::Span::inactive().handle();
    let key = CacheKey::new("http://h/p", "");
    fill(&S, &key, &["x"]).await;
    let compact = key.to_compact();
    assert_eq!(
        S.expire(PurgeTarget::Active(&compact), &trace).await.unwrap(),
        PurgeOutcome::Expired
    );
    let (m, _) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert!(!m.is_fresh(SystemTime::now()), "expired entries stay, stale");
    assert!(
        !S.update_meta(&key, &meta(60), &trace).await.unwrap(),
        "a 304 for another copy (another lineage) changes nothing"
    );
    assert!(S.update_meta(&key, &revalidated(&m), &trace).await.unwrap());
    let (m, _) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert!(m.is_fresh(SystemTime::now()), "a revalidation freshens it");
    let outcome = S
        .purge(PurgeTarget::Active(&compact), PurgeType::Invalidation, &trace)
        .await
        .unwrap();
    assert_eq!(outcome, PurgeOutcome::Purged(None));
    let outcome = S
        .purge(PurgeTarget::Active(&compact), PurgeType::Invalidation, &trace)
        .await
        .unwrap();
    assert_eq!(outcome, PurgeOutcome::NotFound);
    assert!(!S.update_meta(&key, &meta(60), &trace).await.unwrap());
}

/// An entry's body and head are one buffer (one allocation, one shared block): the head's
/// values lie right after the body. A 304 that replaces the head leaves the old one in that
/// buffer, and the entry is charged for it, once however many 304s follow.
#[tokio::test]
async fn a_body_and_its_head_share_one_buffer_and_a_304_counts_the_head_it_replaced() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let trace = pingora_cache::trace::Span::inactive().handle();
    let url = "http://h/packed";
    let key = CacheKey::new(url, "");
    let w = fill(&S, &key, &["hel", "lo"]).await;
    let (m, mut hit) = S.lookup(&key, &trace).await.unwrap().unwrap();
    let body = hit.read_body().await.unwrap().unwrap();
    assert_eq!(&body[..], b"hello");
    // [body][url][value][lengths] (a known name is not text; the URL's origin is its number,
    // 2 bytes)
    let stored_url = 2 + "/packed".len();
    let value = m.headers()["content-type"].as_bytes().as_ptr();
    let at = body.as_ptr() as usize + 5 + stored_url;
    assert_eq!(value as usize, at, "the head follows the body in its buffer");

    // its bytes and the buffer's counts
    // (a known name and a short value: 3 bytes of lengths)
    let head = stored_url + "text/plain".len() + 3 + header::BUFFER_COUNTS;
    let (old, new, kept) = S.revalidate(&key, &revalidated(&m)).unwrap();
    assert_eq!(old, w);
    // the same fields again: only the old head, still in the body's buffer, is added
    assert_eq!(new, w + head);
    assert_eq!(kept.as_ptr(), body.as_ptr(), "the body is not copied");
    // the head is a buffer of its own now, the body where it was: hits and ranges read it
    let (m, mut hit) = S.lookup(&key, &trace).await.unwrap().unwrap();
    let again = hit.read_body().await.unwrap().unwrap();
    assert_eq!((&again[..], again.as_ptr()), (&b"hello"[..], body.as_ptr()));
    hit.seek(1, Some(3)).unwrap();
    assert_eq!(&hit.read_body().await.unwrap().unwrap()[..], b"el");
    // an end before the start reads nothing (it does not panic)
    hit.seek(3, Some(1)).unwrap();
    assert!(hit.read_body().await.unwrap().unwrap().is_empty());
    // the entry's own slices are clamped to the body kept apart, as to a packed one
    let entry = S
        .table
        .get(&key.primary_bin())
        .unwrap()
        .find(None)
        .unwrap()
        .entry
        .clone()
        .unwrap();
    assert!(entry.apart.is_some());
    // the fast path shares the head's buffer for the values; the body is read where it is
    let fresh = S.fresh_plain(&key.primary_bin(), SystemTime::now()).unwrap();
    let shared = fresh.header().shared();
    let fast = fresh.body_in(&shared);
    assert_eq!((&fast[..], fast.as_ptr()), (&b"hello"[..], body.as_ptr()));
    assert_eq!(
        fresh.header().map_in(&shared, 0, |_| true)["content-type"],
        "text/plain"
    );
    assert_eq!(&entry.body_slice(3..99)[..], b"lo");
    let (start, end) = (4, 2);
    assert!(entry.body_slice(start..end).is_empty());
    let (_, again, _) = S.revalidate(&key, &revalidated(&m)).unwrap();
    assert_eq!(again, new, "once");
    assert_eq!(
        S.stats(),
        MemoryStats {
            entries: 1,
            bytes: new
        }
    );
    // a soft purge keeps the head, and the weight
    let compact = key.to_compact();
    S.expire(PurgeTarget::Active(&compact), &trace).await.unwrap();
    let (m, _) = S.lookup(&key, &trace).await.unwrap().unwrap();
    let (before, after, _) = S.revalidate(&key, &revalidated(&m)).unwrap();
    assert_eq!((before, after), (new, new));

    // an empty body keeps no buffer: the head a 304 replaces goes, and is not charged, and
    // nothing is kept apart
    let empty = CacheKey::new("http://h/empty", "");
    let w = fill(&S, &empty, &[]).await;
    let (m, _) = S.lookup(&empty, &trace).await.unwrap().unwrap();
    assert_eq!(S.revalidate(&empty, &revalidated(&m)).unwrap().1, w);
    let apart = |k: &CacheKey| {
        let row = S.table.get(&k.primary_bin()).unwrap();
        row.find(None).unwrap().entry.as_ref().unwrap().apart.is_some()
    };
    assert!(!apart(&empty));
    assert!(apart(&key), "the body with content is apart after its 304");
}

/// A soft purge of an entry never refreshed keeps its body where it is, in its head's
/// buffer, at the same weight.
#[tokio::test]
async fn a_soft_purge_keeps_a_packed_body_in_place() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let trace = pingora_cache::trace::Span::inactive().handle();
    let key = CacheKey::new("http://h/soft", "");
    let w = fill(&S, &key, &["so", "ft"]).await;
    let (_, mut hit) = S.lookup(&key, &trace).await.unwrap().unwrap();
    let before = hit.read_body().await.unwrap().unwrap();
    S.expire(PurgeTarget::Active(&key.to_compact()), &trace)
        .await
        .unwrap();
    let (m, mut hit) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert!(m.fresh_until() <= SystemTime::now(), "stale now");
    let after = hit.read_body().await.unwrap().unwrap();
    assert_eq!((&after[..], after.as_ptr()), (&b"soft"[..], before.as_ptr()));
    let row = S.table.get(&key.primary_bin()).unwrap();
    let entry = row.find(None).unwrap().entry.clone().unwrap();
    drop(row);
    assert!(entry.apart.is_none());
    assert_eq!(entry.weight(), w);
    assert_eq!(S.stats().bytes, w);
}

#[tokio::test]
async fn overwrite_keeps_the_accounting_exact() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let key = CacheKey::new("http://h/o", "");
    fill(&S, &key, &["short"]).await;
    let w = fill(&S, &key, &["a longer body"]).await;
    assert_eq!(S.stats(), MemoryStats { entries: 1, bytes: w });
}

#[tokio::test]
async fn clear_hides_everything_at_once_then_frees_it() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let trace = pingora_cache::trace::Span::inactive().handle();
    let a = CacheKey::new("http://h/c1", "");
    fill(&S, &a, &["x"]).await;
    S.clear();
    assert!(S.lookup(&a, &trace).await.unwrap().is_none());
    let b = CacheKey::new("http://h/c2", "");
    let w = fill(&S, &b, &["y"]).await;
    // the sweep runs on the runtime; wait for its effect, bounded
    for _ in 0..1000 {
        if S.stats().entries == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(S.stats(), MemoryStats { entries: 1, bytes: w });
    assert!(S.lookup(&b, &trace).await.unwrap().is_some());
}

/// A clear frees the table a batch of rows at a time and yields between batches: a request on
/// the same worker runs meanwhile and finds the sweep part done (with one `retain` it waited
/// for the whole table, holding each shard's lock for all of its rows). What it stores then is
/// of the new generation, and stays.
#[tokio::test(flavor = "current_thread")]
async fn a_clear_frees_a_batch_at_a_time_and_lets_others_run_between() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let trace = pingora_cache::trace::Span::inactive().handle();
    let batch = sweep::SWEEP_BATCH;
    for i in 0..3 * batch {
        fill(&S, &CacheKey::new(format!("http://h/batch/{i}"), ""), &["x"]).await;
    }
    assert_eq!(S.stats().entries, 3 * batch);
    let generation = S.generation.fetch_add(1, Ordering::AcqRel) + 1;
    // runs only when the sweep yields (one worker thread)
    let new = CacheKey::new("http://h/batch/new", "");
    let during = tokio::spawn({
        let new = new.clone();
        async move {
            let left = S.stats().entries;
            let w = fill(&S, &new, &["y"]).await;
            (left, w)
        }
    });
    assert_eq!(S.sweep_before(generation).await, 3 * batch);
    let (left, w) = during.await.unwrap();
    assert_eq!(left, 2 * batch, "it ran after the first batch");
    assert_eq!(
        S.stats(),
        MemoryStats { entries: 1, bytes: w },
        "what it stored stays"
    );
    assert!(S.lookup(&new, &trace).await.unwrap().is_some());
    assert_eq!(S.table.len(), 1, "the rows of before go too");
}

#[tokio::test]
async fn sweep_removes_banned_marks_soft_and_tracks_what_escaped() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let v = Validity::default();
    let trace = pingora_cache::trace::Span::inactive().handle();
    let keys: Vec<CacheKey> = [
        "http://h/news/1",
        "http://h/news/2",
        "http://h/about",
        "http://h/soft",
    ]
    .iter()
    .map(|u| CacheKey::new(*u, ""))
    .collect();
    for k in &keys {
        fill(&S, k, &["body"]).await;
    }
    // a fill in progress when the pass runs is reported, and so is a later insert
    let pending = CacheKey::new("http://h/pending", "");
    let _miss = S.get_miss_handler(&pending, &meta(60), &trace).await.unwrap();
    std::thread::sleep(Duration::from_millis(3));
    let ban = |url: &str, soft: bool| Purge {
        target: crate::purge::Target::Ban(crate::purge::Ban {
            host: None,
            url: Some(crate::purge::Pattern::new(url).unwrap()),
            content_type: None,
        }),
        soft,
    };
    v.record(&ban("^/news/", false), crate::purge::now_stamp());
    v.record(&ban("^/soft$", true), crate::purge::now_stamp());
    let upto = v.published();

    let report = S.sweep(&v, upto).await;
    assert_eq!((report.checked, report.removed.len(), report.stale), (4, 2, 1));
    assert!(
        S.fills_min_ms() < u64::MAX,
        "the fill in progress escaped the pass"
    );
    assert!(S.lookup(&keys[0], &trace).await.unwrap().is_none());
    assert!(S.lookup(&keys[1], &trace).await.unwrap().is_none());
    let (about, hit) = S.lookup(&keys[2], &trace).await.unwrap().unwrap();
    assert_eq!(
        CompleteHit::check_mark(&hit).unwrap().load(Ordering::Acquire),
        upto,
        "checked up to the newest record"
    );
    assert!(about.is_fresh(SystemTime::now()));
    let (soft, _) = S.lookup(&keys[3], &trace).await.unwrap().unwrap();
    assert!(
        !soft.is_fresh(SystemTime::now()),
        "soft-banned: stale, still stored"
    );
    assert_eq!(S.stats().entries, 2);

    // a second pass with nothing new checks nothing
    let again = S.sweep(&v, upto).await;
    assert_eq!((again.checked, again.removed.len()), (0, 0));
    assert_eq!(S.inserted_min_ms(), u64::MAX);
    fill(&S, &CacheKey::new("http://h/late", ""), &["x"]).await;
    assert!(
        S.inserted_min_ms() < u64::MAX,
        "an insert after the pass began is noted"
    );
}

/// A host that the key's URL escapes (`*`, `%`, `é`) is matched by the sweeper as requests
/// give it, as hits match it: a ban of that host, and a soft purge of one of its URLs, catch
/// its entries (the sweeper matched the escaped host, `a%2Ab`, and marked them checked).
#[tokio::test]
async fn sweep_matches_a_host_as_requests_give_it_not_as_its_url_escapes_it() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let v = Validity::default();
    let trace = pingora_cache::trace::Span::inactive().handle();
    let banned = crate::key::for_parts("a*b.example", "/p");
    let soft = crate::key::for_parts("caf\u{e9}%.example", "/s");
    let other = crate::key::for_parts("ab.example", "/p");
    assert!(
        banned.primary_key_str().unwrap().contains("a%2Ab"),
        "the URL escapes it"
    );
    for k in [&banned, &soft, &other] {
        fill(&S, k, &["body"]).await;
    }
    std::thread::sleep(Duration::from_millis(3));
    let host_ban = Purge {
        target: crate::purge::Target::Ban(crate::purge::Ban {
            host: Some(crate::purge::Pattern::new("^a\\*b\\.example$").unwrap()),
            url: None,
            content_type: None,
        }),
        soft: false,
    };
    let url_purge = Purge {
        target: crate::purge::Target::Url {
            host: "caf\u{e9}%.example".into(),
            path: "/s".into(),
        },
        soft: true,
    };
    v.record(&host_ban, crate::purge::now_stamp());
    v.record(&url_purge, crate::purge::now_stamp());
    let report = S.sweep(&v, v.published()).await;
    assert_eq!((report.checked, report.removed.len(), report.stale), (3, 1, 1));
    assert!(
        S.lookup(&banned, &trace).await.unwrap().is_none(),
        "banned by its host"
    );
    let (m, _) = S.lookup(&soft, &trace).await.unwrap().unwrap();
    assert!(!m.is_fresh(SystemTime::now()), "soft-purged by its URL");
    let (m, _) = S.lookup(&other, &trace).await.unwrap().unwrap();
    assert!(m.is_fresh(SystemTime::now()), "another host is left");
}

/// Found by the torture test: a purge that removed the URL's row between Pingora's
/// `get_miss_handler` and its `lookup_streaming_write` left the writer without a reader, and
/// pingora-cache panics then ("unable to get body_reader"). The fill is found by its tag.
#[tokio::test]
async fn a_fill_whose_row_a_purge_removed_is_still_found_by_its_writer() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let key = CacheKey::new("http://h/racing", "");
    let trace = pingora_cache::trace::Span::inactive().handle();
    let mut miss = S.get_miss_handler(&key, &meta(60), &trace).await.unwrap();
    S.remove_primary(&key.primary_bin());
    let tag = miss.streaming_write_tag().map(<[u8]>::to_vec);
    let (_, mut reader) = S
        .lookup_streaming_write(&key, tag.as_deref(), &trace)
        .await
        .unwrap()
        .expect("the writer finds its fill");
    miss.write_body(Bytes::from_static(b"body"), true).await.unwrap();
    miss.finish().await.unwrap();
    assert_eq!(read_all(&mut reader).await.unwrap(), b"body");
    assert_eq!(S.fills_in_progress(), 0, "the fill left the registry");
}

/// An answer awaited from the origin counts as a fill validated when its request left, until
/// its guard drops, on every path (here: dropped without ever becoming a fill).
#[test]
fn an_awaited_answer_counts_as_a_fill_until_its_guard_drops() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let sent = SystemTime::now() - Duration::from_secs(3);
    assert_eq!((S.fills_in_progress(), S.fills_min_ms()), (0, u64::MAX));
    let first = S.awaiting(sent);
    let second = S.awaiting(sent + Duration::from_secs(1));
    assert_eq!(S.fills_in_progress(), 2);
    assert_eq!(
        S.fills_min_ms(),
        millis(sent),
        "the oldest one holds records back"
    );
    drop(first);
    assert_eq!(S.fills_min_ms(), millis(sent + Duration::from_secs(1)));
    drop(second);
    assert_eq!((S.fills_in_progress(), S.fills_min_ms()), (0, u64::MAX));
}

/// A fill whose request left before an unsafe request's invalidation, and whose answer began
/// after it, is not handed to other requests while it streams (a partial hit): it would
/// serve what the unsafe request changed, and its commit stores nothing. Its own writer still
/// reads it (by its tag). A fill validated after the invalidation is handed out.
#[tokio::test]
async fn a_fill_from_before_an_invalidation_is_not_handed_to_other_requests() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let trace = pingora_cache::trace::Span::inactive().handle();
    let key = CacheKey::new("http://h/posted-later", "");
    let validated = |t: SystemTime| {
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.append_header("content-type", "text/plain").unwrap();
        CacheMeta::new(t + Duration::from_secs(60), t, 0, 0, h)
    };
    let at = SystemTime::now();
    S.invalidate(key.primary_bin(), at);
    let mut stale = S
        .get_miss_handler(&key, &validated(at - Duration::from_millis(1)), &trace)
        .await
        .unwrap();
    stale.write_body(Bytes::from_static(b"old"), false).await.unwrap();
    assert!(S.lookup(&key, &trace).await.unwrap().is_none(), "handed out");
    let tag = stale.streaming_write_tag().map(<[u8]>::to_vec);
    let own = S
        .lookup_streaming_write(&key, tag.as_deref(), &trace)
        .await
        .unwrap();
    assert!(own.is_some(), "its own writer reads it");
    drop(own);
    drop(stale);
    let mut fresh = S
        .get_miss_handler(&key, &validated(at + Duration::from_millis(1)), &trace)
        .await
        .unwrap();
    fresh.write_body(Bytes::from_static(b"new"), false).await.unwrap();
    assert!(
        S.lookup(&key, &trace).await.unwrap().is_some(),
        "a fill validated after it"
    );
}

/// A successful unsafe request invalidates a URL (RFC 9111 §4.4): what was validated before
/// it and arrives after it is not stored, a fill the origin composed before it or a copy
/// read from memcached before it; what was validated after it is. The invalidation is kept
/// INVALIDATION_GRACE whatever is in flight (clients cannot pin it), at most
/// MAX_INVALIDATIONS, so clients cannot make them cost more.
#[tokio::test]
async fn an_invalidated_url_stores_nothing_validated_before_it() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let trace = pingora_cache::trace::Span::inactive().handle();
    let key = CacheKey::new("http://h/posted", "");
    let primary = key.primary_bin();
    let validated = |t: SystemTime| {
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.append_header("content-type", "text/plain").unwrap();
        CacheMeta::new(t + Duration::from_secs(60), t, 0, 0, h)
    };
    fill(&S, &key, &["v1"]).await;
    let at = SystemTime::now();
    let before = at - Duration::from_millis(1);
    // a fill whose request left before the unsafe request, and whose answer ends after it
    let mut composed = S
        .get_miss_handler(&key, &validated(before), &trace)
        .await
        .unwrap();
    let (removed, recorded) = S.invalidate(primary, at);
    assert_eq!((removed.len(), recorded), (1, true));
    assert!(S.invalidated_since(&primary, before));
    assert!(!S.invalidated_since(&primary, at));
    composed
        .write_body(Bytes::from_static(b"v2"), true)
        .await
        .unwrap();
    assert!(matches!(
        composed.finish().await.unwrap(),
        MissFinishType::Created(0)
    ));
    assert!(S.lookup(&key, &trace).await.unwrap().is_none(), "not stored");
    // nor a copy read from memcached before it
    let copy = MetaParts::from_meta(&validated(before), "http://h/posted");
    assert!(S
        .insert(&key, copy, Bytes::from_static(b"v2"), S.generation())
        .await
        .is_none());
    // what was validated after it is stored
    let after = MetaParts::from_meta(&validated(at + Duration::from_millis(1)), "http://h/posted");
    assert!(S
        .insert(&key, after, Bytes::from_static(b"v3"), S.generation())
        .await
        .is_some());
    let (_, mut hit) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert_eq!(read_all(&mut hit).await.unwrap(), b"v3");
    // kept INVALIDATION_GRACE, even while a request from before it is in flight
    let older = S.awaiting(at - Duration::from_secs(60));
    S.expire_invalidations(at + INVALIDATION_GRACE - Duration::from_millis(1));
    assert_eq!(S.invalidations(), 1);
    S.expire_invalidations(at + INVALIDATION_GRACE + Duration::from_millis(1));
    assert_eq!(S.invalidations(), 0, "not pinned by what is in flight");
    drop(older);
    // bounded: past MAX_INVALIDATIONS nothing more is recorded, a URL already kept is moved
    let now = SystemTime::now();
    for i in 0..MAX_INVALIDATIONS {
        let k = CacheKey::new(format!("http://h/{i}"), "");
        assert!(S.invalidate(k.primary_bin(), now).1);
    }
    assert!(!S.invalidate(primary, now).1, "full");
    assert_eq!(S.invalidations(), MAX_INVALIDATIONS);
    let kept = CacheKey::new("http://h/0", "").primary_bin();
    let moved = now + Duration::from_secs(1);
    assert!(S.invalidate(kept, moved).1);
    assert!(S.invalidated_since(&kept, moved - Duration::from_millis(1)));
    assert!(!S.invalidated_since(&primary, before));
}

/// A clear voids the fills in progress: what they bring began before it (a purge of
/// everything, a new upstream generation). Not streamed to later lookups, not stored; a fill
/// begun after the clear is.
#[tokio::test]
async fn a_clear_voids_the_fills_in_progress_and_not_the_later_ones() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let trace = pingora_cache::trace::Span::inactive().handle();
    let key = CacheKey::new("http://h/voided", "");
    let mut before = S.get_miss_handler(&key, &meta(60), &trace).await.unwrap();
    before
        .write_body(Bytes::from_static(b"old"), false)
        .await
        .unwrap();
    assert!(
        S.lookup(&key, &trace).await.unwrap().is_some(),
        "streamed before the clear"
    );
    S.clear();
    assert!(
        S.lookup(&key, &trace).await.unwrap().is_none(),
        "a voided fill is not streamed"
    );
    before.write_body(Bytes::new(), true).await.unwrap();
    assert!(matches!(
        before.finish().await.unwrap(),
        MissFinishType::Created(0)
    ));
    assert!(S.lookup(&key, &trace).await.unwrap().is_none(), "nor stored");
    assert_eq!((S.stats().entries, S.fills_in_progress()), (0, 0));

    let w = fill(&S, &key, &["new"]).await;
    let (_, mut hit) = S
        .lookup(&key, &trace)
        .await
        .unwrap()
        .expect("a fill begun after is stored");
    assert_eq!(read_all(&mut hit).await.unwrap(), b"new");
    assert_eq!(S.stats(), MemoryStats { entries: 1, bytes: w });

    // a voided fill that ends after a later one stored the key: it reports nothing (Pingora
    // admits 0, which the eviction manager ignores), and leaves that entry in place
    let mut slow = S.get_miss_handler(&key, &meta(60), &trace).await.unwrap();
    S.clear();
    fill(&S, &key, &["newer"]).await;
    slow.write_body(Bytes::from_static(b"older"), true).await.unwrap();
    assert!(matches!(slow.finish().await.unwrap(), MissFinishType::Created(0)));
    let (_, mut hit) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert_eq!(read_all(&mut hit).await.unwrap(), b"newer");

    // a copy looked up (in memcached) before a clear is not stored after it
    let parts = MetaParts::from_meta(&meta(60), "http://h/promoted");
    let before = S.generation();
    S.clear();
    let other = CacheKey::new("http://h/promoted", "");
    assert!(S
        .insert(&other, parts.clone(), Bytes::from_static(b"x"), before)
        .await
        .is_none());
    assert!(S.lookup(&other, &trace).await.unwrap().is_none());
    assert!(S
        .insert(&other, parts, Bytes::from_static(b"x"), S.generation())
        .await
        .is_some());

    // nor is a copy from before a clear refreshed by a 304 (in L1, nor then in memcached)
    let stale = CacheKey::new("http://h/stale", "");
    fill(&S, &stale, &["s"]).await;
    let (old, _) = S.lookup(&stale, &trace).await.unwrap().unwrap();
    assert!(S.revalidate(&stale, &revalidated(&old)).is_some(), "the control");
    S.clear();
    assert!(S.revalidate(&stale, &revalidated(&old)).is_none());
}

/// What an entry costs beside its body and its head's buffer is mostly these: an `Arc` of
/// [`super::Stored`] (its allocation), and its row's slots, inline for one variant. They only
/// grow on purpose.
#[test]
fn an_entry_keeps_its_bookkeeping_small() {
    use std::mem::size_of;
    assert_eq!(size_of::<Option<super::Nanos>>(), 8);
    assert_eq!(size_of::<StoredHeader>(), 32);
    assert_eq!(size_of::<MetaParts>(), 80);
    assert_eq!(size_of::<super::Stored>(), 104);
    // the `Arc`'s allocation, two counters and the entry, with glibc's 8-byte header, fits
    // its 128-byte size class (it took 208 with the weight kept and the variance inline,
    // which is now in the head's buffer, 192 with the body's own `Bytes`, now the head's,
    // 160 with the head's buffer a `Bytes`, now an `Arc<[u8]>`, and 144 with the epoch of
    // `Age` and a 64-bit generation in the entry)
    assert!(16 + size_of::<super::Stored>() + 8 <= 128);
    assert_eq!(size_of::<super::Slot>(), 16);
    // a row: its key and its slots, the primary one inline (40 bytes in the table, 48 with
    // the slot's variance kept in it)
    assert_eq!(size_of::<super::Slots>(), 24);
    assert_eq!(size_of::<(HashBinary, super::Slots)>(), 40);
}

/// A row holds its primary slot inline when it is the only one, and a list otherwise (a
/// URL's first slot may be a secondary variant's, its primary purged); emptied, it holds
/// none, and every slot comes back from it with its variance, whatever its form.
#[test]
fn a_row_holds_its_primary_slot_inline_and_more_in_a_list() {
    use super::{Slot, Slots};
    let v = |b: u8| Some([b; 16]);
    // a slot told apart by its entry's URL
    let slot = |name: &str| Slot {
        entry: Some(Stored::new(
            MetaParts::from_meta(&meta(60), &format!("http://h/{name}")),
            &[],
            0,
        )),
        fill: None,
    };
    let name = |s: &Slot| s.entry.as_ref().map_or(String::new(), |e| e.url().into_owned());
    let listed = |row: &Slots| row.iter().map(|(v, s)| (v, name(s))).collect::<Vec<_>>();
    let mut row = Slots::default();
    assert!(row.is_empty() && row.find(None).is_none());
    assert_eq!(name(row.push(None, slot("p"))), "http://h/p");
    assert!(matches!(row, Slots::Primary(_)));
    assert!(row.find(v(1)).is_none());
    assert_eq!(row.only_primary().map(name).as_deref(), Some("http://h/p"));
    assert_eq!(name(row.push(v(1), slot("a"))), "http://h/a", "the slot pushed");
    row.push(v(2), slot("b"));
    assert!(matches!(&row, Slots::Many(s) if s.len() == 3));
    assert!(row.only_primary().is_none());
    assert_eq!(row.find(v(2)).map(name).as_deref(), Some("http://h/b"));
    assert_eq!(row.find_mut(v(1)).map(|s| name(s)).as_deref(), Some("http://h/a"));
    assert_eq!(row.find(None).map(name).as_deref(), Some("http://h/p"));
    assert!(row.find(v(3)).is_none());
    // the slot there, or a new empty one
    assert_eq!(name(row.get_or_add(v(2))), "http://h/b");
    assert!(row.get_or_add(v(3)).is_empty());
    assert_eq!(row.iter().count(), 4);
    row.prune();
    // the primary and a secondary kept: still a list, in order
    row.retain(|s| name(s) != "http://h/b");
    assert_eq!(
        listed(&row),
        vec![(None, "http://h/p".into()), (v(1), "http://h/a".into())]
    );
    // the primary gone: a secondary left alone stays in the list (inline is the primary's)
    row.retain(|s| name(s) != "http://h/p");
    assert!(matches!(&row, Slots::Many(s) if s.len() == 1));
    assert!(row.find(None).is_none() && row.only_primary().is_none());
    // the primary back, then the secondary emptied and pruned: the primary back inline
    row.push(None, slot("p2"));
    assert_eq!(
        listed(&row),
        vec![(v(1), "http://h/a".into()), (None, "http://h/p2".into())]
    );
    row.find_mut(v(1)).unwrap().entry = None;
    row.prune();
    assert!(
        matches!(row, Slots::Primary(_)),
        "a primary slot left alone goes back inline"
    );
    assert_eq!(
        row.into_iter().map(|(v, s)| (v, name(&s))).collect::<Vec<_>>(),
        vec![(None, "http://h/p2".into())]
    );

    // a secondary variant alone takes a list of one, not Vec's first four
    let mut alone = Slots::default();
    alone.push(v(5), slot("s"));
    assert!(matches!(&alone, Slots::Many(s) if s.capacity() == 1));
    // a list that lost most of its slots gives the room back
    let mut shrunk = Slots::default();
    for i in 1..=6 {
        shrunk.push(v(i), slot(&i.to_string()));
    }
    shrunk.retain(|s| name(s) == "http://h/1" || name(s) == "http://h/2");
    assert!(matches!(&shrunk, Slots::Many(s) if s.len() == 2 && s.capacity() == 2));

    // empty slots are let go; an emptied list is freed
    let mut many = Slots::default();
    many.push(None, Slot::default());
    many.push(v(1), Slot::default());
    many.prune();
    assert!(many.is_empty());
    assert!(
        matches!(many, Slots::Many(ref s) if s.capacity() == 0),
        "an emptied list is freed"
    );
    let mut one = Slots::default();
    one.push(None, Slot::default());
    one.prune();
    assert!(
        matches!(one, Slots::Many(ref s) if s.capacity() == 0),
        "an empty row allocates nothing"
    );
    let mut iter_mut = Slots::default();
    iter_mut.push(None, Slot::default());
    iter_mut.push(v(4), Slot::default());
    assert_eq!(
        iter_mut.iter_mut().map(|(v, _)| v).collect::<Vec<_>>(),
        vec![None, v(4)]
    );
}

/// The fast hit path takes a URL whose only slot is its primary one: not while another
/// variant is stored beside it, again once that one goes, and never a secondary variant
/// left alone.
#[tokio::test]
async fn the_fast_path_serves_a_url_whose_other_variants_went() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let key = CacheKey::new("http://h/fast", "");
    let mut variant = CacheKey::new("http://h/fast", "");
    variant.set_variance_key(*b"0123456789abcdef");
    let now = SystemTime::now;
    fill(&S, &key, &["a"]).await;
    assert!(S.fresh_plain(&key.primary_bin(), now()).is_some());
    fill(&S, &variant, &["b"]).await;
    assert!(
        S.fresh_plain(&key.primary_bin(), now()).is_none(),
        "two variants: the full path"
    );
    assert!(S.remove_variant(variant.primary_bin(), variant.variance_bin()));
    let fast = S
        .fresh_plain(&key.primary_bin(), now())
        .expect("the primary alone again");
    assert_eq!(&fast.body()[..], b"a");
    fill(&S, &variant, &["b"]).await;
    assert!(S.remove_variant(key.primary_bin(), None));
    assert!(
        S.fresh_plain(&key.primary_bin(), now()).is_none(),
        "a secondary variant alone"
    );
    let trace = pingora_cache::trace::Span::inactive().handle();
    assert!(S.lookup(&variant, &trace).await.unwrap().is_some());
    assert!(S.lookup(&key, &trace).await.unwrap().is_none());
}

/// An entry keeps its generation's low 32 bits: it is of its own generation only, older
/// than the next ones across the wrap of the 32 bits, and not older than its own or one
/// before it.
#[test]
fn an_entry_s_generation_is_compared_across_the_wrap_of_its_32_bits() {
    let parts = MetaParts::from_meta(&meta(60), "http://h/g");
    for stored_at in [0u64, 7, u32::MAX as u64, (1 << 32) + 5, (3 << 32) - 1] {
        let e = super::Stored::new(parts.clone(), &[Bytes::from_static(b"x")], stored_at);
        assert!(e.of_generation(stored_at), "{stored_at}");
        assert!(!e.of_generation(stored_at + 1) && !e.of_generation(stored_at.wrapping_sub(1)));
        assert!(!e.before_generation(stored_at), "{stored_at}");
        assert!(e.before_generation(stored_at + 1) && e.before_generation(stored_at + 1000));
        assert!(!e.before_generation(stored_at.wrapping_sub(1)), "{stored_at}");
    }
}

/// A fill's entry and a copy promoted from memcached are built on the builder thread
/// ([`super::build`]), not on the worker that stored them.
#[tokio::test]
async fn fills_and_promoted_copies_are_built_on_the_builder_thread() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let filled = CacheKey::new("http://h/built-fill", "");
    fill(&S, &filled, &["a", "b"]).await;
    assert!(super::build::tests::built_off_thread("http://h/built-fill"));
    let promoted = CacheKey::new("http://h/built-copy", "");
    let parts = MetaParts::from_meta(&meta(60), "http://h/built-copy");
    assert!(S
        .insert(&promoted, parts, Bytes::from_static(b"c"), S.generation())
        .await
        .is_some());
    assert!(super::build::tests::built_off_thread("http://h/built-copy"));
}

/// A miss handler dropped after its body's end was written (its `finish` dropped while the
/// entry was being built on the builder thread) leaves its readers a whole body, not an error,
/// and no fill in progress; dropped before `finish`, nothing is stored. One dropped before the
/// end fails its readers.
#[tokio::test]
async fn a_fill_dropped_after_its_end_was_written_is_read_to_the_end() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let trace = pingora_cache::trace::Span::inactive().handle();
    let key = CacheKey::new("http://h/whole", "");
    let mut miss = S.get_miss_handler(&key, &meta(60), &trace).await.unwrap();
    miss.write_body(Bytes::from_static(b"who"), false).await.unwrap();
    miss.write_body(Bytes::from_static(b"le"), true).await.unwrap();
    let (_, mut reader) = S.lookup(&key, &trace).await.unwrap().unwrap();
    drop(miss);
    assert_eq!(read_all(&mut reader).await.unwrap(), b"whole");
    assert!(S.lookup(&key, &trace).await.unwrap().is_none(), "not stored");
    assert!(S.fills.is_empty(), "no fill left in progress");

    // a `finish` dropped while its entry is built (polled once: its job sent): the readers
    // read the whole body, and no fill is left, whether or not the entry was stored first
    let built = CacheKey::new("http://h/cancelled", "");
    let mut miss = S.get_miss_handler(&built, &meta(60), &trace).await.unwrap();
    miss.write_body(Bytes::from_static(b"all of it"), true)
        .await
        .unwrap();
    let (_, mut reader) = S.lookup(&built, &trace).await.unwrap().unwrap();
    let mut finish = miss.finish();
    let _ = futures::poll!(&mut finish);
    drop(finish);
    assert_eq!(read_all(&mut reader).await.unwrap(), b"all of it");
    assert!(S.fills.is_empty(), "no fill left in progress");

    let cut = CacheKey::new("http://h/cut", "");
    let mut miss = S.get_miss_handler(&cut, &meta(60), &trace).await.unwrap();
    miss.write_body(Bytes::from_static(b"par"), false).await.unwrap();
    let (_, mut reader) = S.lookup(&cut, &trace).await.unwrap().unwrap();
    drop(miss);
    assert!(read_all(&mut reader).await.is_err(), "a truncated body fails");
    assert!(S.fills.is_empty());
}

/// A body over the builder's limit is built where it arrives, whole, and served.
#[tokio::test]
async fn a_fill_over_the_builder_s_limit_is_stored_whole() {
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let trace = pingora_cache::trace::Span::inactive().handle();
    let key = CacheKey::new("http://h/large", "");
    let half = "x".repeat(super::build::OFF_THREAD_MAX / 2 + 1);
    let half: &'static str = Box::leak(half.into_boxed_str());
    fill(&S, &key, &[half, half]).await;
    assert!(!super::build::tests::built_off_thread("http://h/large"));
    let (_, mut hit) = S.lookup(&key, &trace).await.unwrap().unwrap();
    assert_eq!(read_all(&mut hit).await.unwrap().len(), 2 * half.len());
}

#[test]
fn a_time_kept_in_8_bytes_comes_back_exact() {
    let now = SystemTime::now();
    assert_eq!(Nanos::of(now).get(), now);
    let t = SystemTime::UNIX_EPOCH + Duration::new(4_000_000_000, 999_999_999);
    assert_eq!(Nanos::of(t).get(), t);
    // before 1970 (or at its first instant): the first nanosecond, ordered before any other
    let early = Nanos::of(SystemTime::UNIX_EPOCH - Duration::from_secs(1));
    assert_eq!(early, Nanos::of(SystemTime::UNIX_EPOCH));
    assert!(early < Nanos::of(SystemTime::UNIX_EPOCH + Duration::from_nanos(2)));
}

/// A sweep's removal of a key from the eviction manager is followed by a check of the key in
/// L1: a refill committed and admitted right before the removal (which untracked it) is tracked
/// again. Checked first and removed after, it was left in L1, uncounted and never evicted
/// unless hit again. A refill the manager no longer tracked (evicted) is left untracked.
#[test]
fn a_refill_admitted_before_its_key_is_untracked_is_tracked_again() {
    use crate::storage::eviction::{Eviction, Policy};
    use pingora_cache::eviction::{CacheEntryKey, EvictionManager};
    use pingora_cache::CacheEntryKeyRef;
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    for policy in [Policy::S3fifo, Policy::Lru, Policy::Tinyufo] {
        let m = Eviction::new(policy, 1 << 20, 1024);
        let key = CacheKey::new(format!("http://h/refilled/{policy:?}"), "");
        let compact = key.to_compact();
        let item = CacheEntryKey::from_entry_id(compact.clone(), None);
        // the sweep removed the old entry; the refill lands, and is admitted, right before the
        // sweep's removal of the key from the manager
        let mut weight = 0;
        S.untrack_with(&compact, &m, || {
            weight = rt.block_on(fill(&S, &key, &["new"]));
            assert!(m.admit(item.clone(), weight, SystemTime::now()).is_empty());
            let removed = m.remove_tracked(&compact);
            assert_eq!(m.total_size(), 0, "{policy:?}");
            removed
        });
        // (TinyUFO has no peek: its counts say it)
        assert!(
            policy == Policy::Tinyufo || m.peek(&item),
            "{policy:?}: the refill is tracked again"
        );
        assert_eq!(
            (m.total_items(), m.total_size()),
            (1, weight),
            "{policy:?}: at its weight"
        );

        // a key L1 does not hold now is untracked
        let gone = CacheKey::new(format!("http://h/gone/{policy:?}"), "");
        let gone_item = CacheEntryKey::from_entry_id(gone.to_compact(), None);
        assert!(m.admit(gone_item.clone(), 100, SystemTime::now()).is_empty());
        S.untrack(&gone.to_compact(), &m);
        assert!(!m.peek(&gone_item), "{policy:?}: untracked");
        assert_eq!((m.total_items(), m.total_size()), (1, weight), "{policy:?}");

        // a refill the manager evicted before the removal (its removal from L1 on its way) is
        // not tracked again: it would keep a weight once L1 removes the entry
        let evicted = CacheKey::new(format!("http://h/evicted/{policy:?}"), "");
        let evicted_item = CacheEntryKey::from_entry_id(evicted.to_compact(), None);
        S.untrack_with(&evicted.to_compact(), &m, || {
            let w = rt.block_on(fill(&S, &evicted, &["gone soon"]));
            assert!(m.admit(evicted_item.clone(), w, SystemTime::now()).is_empty());
            m.remove(CacheEntryKeyRef::from(&evicted_item));
            m.remove_tracked(&evicted.to_compact())
        });
        assert_eq!(
            (m.total_items(), m.total_size()),
            (1, weight),
            "{policy:?}: not tracked again"
        );
    }
}

/// Two fills of one key commit in one order and are admitted in the other (Pingora admits
/// after the commit, outside any lock of L1): S3-FIFO tracks the weight of the entry L1
/// holds, not the weight the late admission was handed, so its total stays what L1 holds.
#[tokio::test]
async fn admissions_out_of_order_track_the_weight_l1_holds() {
    use crate::storage::eviction::{Eviction, Policy};
    use pingora_cache::eviction::{CacheEntryKey, EvictionManager};
    static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
    let m: &'static Eviction = Box::leak(Box::new(Eviction::new(Policy::S3fifo, 1 << 24, 1024)));
    S.set_eviction(m);
    let key = CacheKey::new("http://h/twice", "");
    let item = CacheEntryKey::from_entry_id(key.to_compact(), None);
    let small = fill(&S, &key, &["a"]).await;
    let large = fill(&S, &key, &[&*Box::leak("b".repeat(100_000).into_boxed_str())]).await;
    assert!(large > small + 90_000);
    assert_eq!(S.stats().bytes, large, "the second fill replaced the first");
    let now = SystemTime::now();
    assert!(m.admit(item.clone(), large, now).is_empty());
    assert!(m.admit(item, small, now).is_empty());
    assert_eq!(m.total_size(), S.stats().bytes);
    // an admission of a key L1 no longer holds (purged since its commit) tracks nothing
    let gone = CacheKey::new("http://h/gone-before-admission", "");
    let weight = fill(&S, &gone, &["c"]).await;
    assert!(S.remove_variant(gone.primary_bin(), None));
    let gone_item = CacheEntryKey::from_entry_id(gone.to_compact(), None);
    assert!(m.admit(gone_item.clone(), weight, now).is_empty());
    assert!(!m.peek(&gone_item));
    assert_eq!(m.total_size(), S.stats().bytes);
}
