use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pingora_cache::{CacheMeta, ForcedFreshness};
use pingora_http::{RequestHeader, ResponseHeader};

use super::parse::split_tags;
use super::*;

fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build(method, path.as_bytes(), None).unwrap();
    for (k, v) in headers {
        r.append_header(k.to_string(), *v).unwrap();
    }
    r
}

fn parse_req(method: &str, path: &str, headers: &[(&str, &str)]) -> Result<Purge, PurgeError> {
    parse(&req(method, path, headers), "www.example.org", path)
}

fn entry(headers: &[(&str, &str)], validated: SystemTime) -> CacheMeta {
    let mut h = ResponseHeader::build(200, None).unwrap();
    for (k, v) in headers {
        h.append_header(k.to_string(), *v).unwrap();
    }
    CacheMeta::new(validated + Duration::from_secs(60), validated, 10, 10, h)
}

#[test]
fn plain_purge_is_a_url_purge() {
    let p = parse_req("PURGE", "/a/b?x=1", &[]).unwrap();
    assert!(
        matches!(p.target, Target::Url { ref host, ref path } if host == "www.example.org" && path == "/a/b?x=1")
    );
    assert!(!p.soft);
    assert!(parse_req("PURGE", "/a", &[("soft-purge", "1")]).unwrap().soft);
    assert!(
        parse_req("PURGE", "/a", &[("fastly-soft-purge", "1")])
            .unwrap()
            .soft
    );
}

#[test]
fn every_client_shape_parses() {
    let kind = |m: &str, p: &str, h: &[(&str, &str)]| parse_req(m, p, h).map(|p| (p.kind(), p.soft));
    assert_eq!(
        kind("PURGE", "/.*", &[("x-purge-method", "regex")]),
        Ok(("ban", false))
    );
    assert_eq!(
        kind("BAN", "/", &[("x-url", "^/news"), ("x-host", ".*")]),
        Ok(("ban", false))
    );
    assert_eq!(
        kind("BAN", "/", &[("x-cache-tags", "(^|,)(a|b)(,|$)")]),
        Ok(("tag-pattern", false))
    );
    assert_eq!(
        kind("BAN", "/", &[("cache-tags", "node:1|node:2")]),
        Ok(("tag-pattern", false))
    );
    assert_eq!(
        kind("PURGEKEYS", "/", &[("xkey-softpurge", "a b")]),
        Ok(("tags", true))
    );
    assert_eq!(
        kind("PURGEKEYS", "/", &[("xkey-purge", "a b")]),
        Ok(("tags", false))
    );
    assert_eq!(
        kind("PURGETAGS", "/", &[("x-cache-tags", "a,b")]),
        Ok(("tags", false))
    );
    assert_eq!(
        kind("PURGE", "/", &[("surrogate-key", "a b")]),
        Ok(("tags", false))
    );
    assert_eq!(
        kind("PURGE", "/", &[("x-magento-tags-pattern", "((^|,)cat_p_1(,|$))")]),
        Ok(("tag-pattern", false))
    );
    assert_eq!(kind("URIBAN", "/styles/.*", &[]), Ok(("ban", false)));
}

#[test]
fn tags_are_split_trimmed_and_deduplicated() {
    let p = parse_req("PURGETAGS", "/", &[("x-cache-tags", " b, a ,,b ")]).unwrap();
    assert!(matches!(p.target, Target::Tags(ref t) if t == &["a", "b"]));
    let p = parse_req("PURGEKEYS", "/", &[("xkey-purge", "x  y\tx")]).unwrap();
    assert!(matches!(p.target, Target::Tags(ref t) if t == &["x", "y"]));
}

#[test]
fn malformed_purges_are_refused_with_a_reason() {
    let e = parse_req("BAN", "/", &[("x-url", "(unclosed")]).unwrap_err();
    assert!(
        matches!(e, PurgeError::BadPattern { ref header, .. } if header == "x-url"),
        "{e}"
    );
    assert!(parse_req("BAN", "/", &[]).is_err(), "a BAN must say what");
    assert!(parse_req("PURGEKEYS", "/", &[]).is_err());
    assert!(parse_req("PURGETAGS", "/", &[("x-cache-tags", " , ")]).is_err());
    assert!(parse_req("PURGE", "/(", &[("x-purge-method", "regex")]).is_err());
    let huge = "a".repeat(MAX_PATTERN_BYTES + 1);
    assert_eq!(
        parse_req("BAN", "/", &[("x-url", &huge)]).unwrap_err(),
        PurgeError::TooLong("x-url".into())
    );
}

#[test]
fn access_needs_an_allowed_network_and_the_token() {
    let open = Access {
        allow: vec!["127.0.0.1/32".parse().unwrap(), "::1/128".parse().unwrap()],
        token: None,
    };
    assert!(open.permits(Some("127.0.0.1".parse().unwrap()), None));
    assert!(
        open.permits(Some("::ffff:127.0.0.1".parse().unwrap()), None),
        "v4-mapped v6"
    );
    assert!(!open.permits(Some("127.0.0.2".parse().unwrap()), None));
    assert!(!open.permits(None, None));
    let tokened = Access {
        token: Some("s3cret".into()),
        ..open
    };
    assert!(!tokened.permits(Some("127.0.0.1".parse().unwrap()), None));
    assert!(!tokened.permits(Some("127.0.0.1".parse().unwrap()), Some("Bearer wrong")));
    assert!(tokened.permits(Some("127.0.0.1".parse().unwrap()), Some("Bearer s3cret")));
    // RFC 9110 §11.1: the scheme is case-insensitive
    for spelling in ["bearer s3cret", "BEARER s3cret", "Bearer  s3cret"] {
        assert!(
            tokened.permits(Some("127.0.0.1".parse().unwrap()), Some(spelling)),
            "{spelling}"
        );
    }
    assert!(!tokened.permits(Some("127.0.0.1".parse().unwrap()), Some("Basic s3cret")));
    assert!(!tokened.permits(Some("127.0.0.1".parse().unwrap()), Some("s3cret")));
}

#[test]
fn bans_apply_to_entries_validated_before_them_only() {
    let v = Validity::default();
    let before = SystemTime::now() - Duration::from_secs(10);
    let old = entry(&[("content-type", "text/html")], before);
    assert_eq!(v.verdict("www.example.org", "/news/1", &old), None);
    v.record(
        &parse_req("BAN", "/", &[("x-url", "^/news/")]).unwrap(),
        now_stamp(),
    );
    assert_eq!(
        v.verdict("www.example.org", "/news/1", &old),
        Some(ForcedFreshness::ForceMiss)
    );
    assert_eq!(v.verdict("www.example.org", "/about", &old), None);
    let fresh = entry(&[], SystemTime::now() + Duration::from_millis(5));
    assert_eq!(
        v.verdict("www.example.org", "/news/1", &fresh),
        None,
        "stored after the ban"
    );
}

#[test]
fn tag_purges_match_every_tag_header() {
    let v = Validity::default();
    let before = SystemTime::now() - Duration::from_secs(10);
    v.record(
        &parse_req("PURGEKEYS", "/", &[("xkey-purge", "p1")]).unwrap(),
        now_stamp(),
    );
    assert!(v
        .verdict("h", "/", &entry(&[("xkey", "p0 p1")], before))
        .is_some());
    assert!(v
        .verdict("h", "/", &entry(&[("x-magento-tags", "p2,p1")], before))
        .is_some());
    assert!(
        v.verdict("h", "/", &entry(&[("xkey", "p10")], before)).is_none(),
        "whole tags only"
    );
    v.record(
        &parse_req("PURGEKEYS", "/", &[("xkey-softpurge", "s")]).unwrap(),
        now_stamp(),
    );
    assert!(matches!(
        v.verdict("h", "/", &entry(&[("surrogate-key", "s")], before)),
        Some(ForcedFreshness::ForceExpiredServeStale { expired_at: Some(_) })
    ));
}

#[test]
fn tag_patterns_match_the_header_they_name() {
    let v = Validity::default();
    let before = SystemTime::now() - Duration::from_secs(10);
    v.record(
        &parse_req("PURGE", "/", &[("x-magento-tags-pattern", "((^|,)cat_p_1(,|$))")]).unwrap(),
        now_stamp(),
    );
    assert!(v
        .verdict("h", "/", &entry(&[("x-magento-tags", "cat_c_5,cat_p_1")], before))
        .is_some());
    assert!(v
        .verdict("h", "/", &entry(&[("x-magento-tags", "cat_p_12")], before))
        .is_none());
    assert!(v
        .verdict("h", "/", &entry(&[("xkey", "cat_p_1")], before))
        .is_none());
}

#[test]
fn records_stay_bounded() {
    let old = entry(&[], SystemTime::now() - Duration::from_secs(10));
    let v = Validity::with_limit(100);
    for i in 0..1000 {
        v.record(
            &parse_req("BAN", "/", &[("x-url", &format!("^/b{i}$"))]).unwrap(),
            now_stamp(),
        );
        v.record(
            &parse_req("PURGEKEYS", "/", &[("xkey-purge", &format!("t{i}"))]).unwrap(),
            now_stamp(),
        );
    }
    assert!(v.len() <= 200, "{} records", v.len());
    // folded records still invalidate what they covered
    assert_eq!(v.verdict("h", "/b0", &old), Some(ForcedFreshness::ForceMiss));
    let fresh = entry(&[("xkey", "t0")], SystemTime::now() + Duration::from_millis(5));
    assert_eq!(v.verdict("h", "/b0", &fresh), None);
}

#[test]
fn a_batch_is_validated_whole() {
    let ok = Batch::parse(
        br#"{"urls": ["http://www.example.org/a", "http://WWW.example.org/a", "http://x.org/b?q=1"],
        "tags": ["t1", "t2", "t1"], "bans": [{"url": "^/news"}], "soft": true}"#,
    )
    .unwrap();
    assert_eq!(
        ok.iter().map(Purge::kind).collect::<Vec<_>>(),
        ["url", "url", "tags", "ban"]
    );
    assert!(ok.iter().all(|p| p.soft));
    for (body, names) in [
        (&br#"{"urls": ["/no-host"]}"#[..], "urls[0]"),
        (
            br#"{"urls": ["http://a.org/"], "bans": [{"url": "("}]}"#,
            "bans[0].url",
        ),
        (br#"{"bans": [{}]}"#, "bans[0]"),
        (br#"{"tags": ["a b"]}"#, "tags[0]"),
        (br#"{"urlz": []}"#, "unknown field"),
        (b"not json", "invalid batch"),
    ] {
        let e = Batch::parse(body).unwrap_err();
        assert!(e.contains(names), "{e}");
    }
}

#[test]
fn log_records_round_trip() {
    let at = now_stamp();
    for p in [
        parse_req("BAN", "/", &[("x-url", "^/news"), ("x-content-type", "html")]).unwrap(),
        parse_req("PURGEKEYS", "/", &[("xkey-softpurge", "a b")]).unwrap(),
        parse_req("PURGE", "/", &[("x-magento-tags-pattern", "((^|,)cat_p_1(,|$))")]).unwrap(),
    ] {
        let bytes = LogRecord::of(&p, at).unwrap().encode();
        let (back, when) = LogRecord::decode(&bytes).unwrap();
        assert_eq!((back.kind(), back.soft), (p.kind(), p.soft));
        assert_eq!(millis(when), millis(at));
        let v = Validity::default();
        v.record(&back, when);
        assert!(!v.is_empty());
    }
    let url = LogRecord::of(&parse_req("PURGE", "/x?a=1", &[]).unwrap(), at).unwrap();
    let (back, _) = LogRecord::decode(&url.encode()).unwrap();
    assert!(
        matches!(back.target, Target::Url { ref host, ref path } if host == "www.example.org" && path == "/x?a=1")
    );
    assert!(LogRecord::decode(b"{garbage").is_none());
}

#[test]
fn a_hundred_thousand_bans_stay_bounded() {
    let v = Validity::default();
    let ban = parse_req("BAN", "/", &[("x-url", "^/gone/")]).unwrap();
    let old = entry(&[], SystemTime::now() - Duration::from_secs(10));
    for _ in 0..100_000 {
        v.record(&ban, now_stamp());
    }
    assert!(v.len() <= MAX_RECORDS, "{} records kept", v.len());
    assert_eq!(v.verdict("h", "/gone/x", &old), Some(ForcedFreshness::ForceMiss));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the separators and spacing, a tag list splits into exactly its tags.
        #[test]
        fn tag_lists_split_into_their_tags(tags in proptest::collection::btree_set("[a-zA-Z0-9:_.-]{1,12}", 1..8),
                                           pad in "[ \t]{0,3}") {
            let tags: Vec<String> = tags.into_iter().collect();
            let spaced = tags.iter().map(|t| format!("{pad}{t}{pad}")).collect::<Vec<_>>().join(" ");
            prop_assert_eq!(split_tags(&spaced, ' '), tags.clone());
            let commas = tags.iter().map(|t| format!("{pad}{t}")).collect::<Vec<_>>().join(",");
            prop_assert_eq!(split_tags(&commas, ','), tags);
        }

        /// An entry carrying a purged tag is invalid, one that does not is untouched.
        #[test]
        fn tag_purges_hit_exactly_the_tagged(tag in "[a-z]{1,8}", other in "[A-Z]{1,8}") {
            let v = Validity::default();
            let before = SystemTime::now() - Duration::from_secs(10);
            v.record(&Purge { target: Target::Tags(vec![tag.clone()]), soft: false }, now_stamp());
            let tagged_value = format!("{other} {tag}");
            let tagged = entry(&[("xkey", tagged_value.as_str())], before);
            let untagged = entry(&[("xkey", other.as_str())], before);
            prop_assert_eq!(v.verdict("h", "/", &tagged), Some(ForcedFreshness::ForceMiss));
            prop_assert_eq!(v.verdict("h", "/", &untagged), None);
        }

        /// A ban on an escaped literal path matches that path and no other.
        #[test]
        fn literal_bans_match_only_their_path(path in "/[a-z0-9/._-]{0,20}", other in "/[a-z0-9/._-]{0,20}") {
            let ban = Ban { host: None, url: Some(Pattern::new(&format!("^{}$", regex::escape(&path))).unwrap()), content_type: None };
            prop_assert!(ban.matches("h", &path, ""));
            prop_assert_eq!(ban.matches("h", &other, ""), other == path);
        }

        /// No header value makes the parser panic: it returns a purge or a reason.
        #[test]
        fn parsing_never_panics(method in prop::sample::select(vec!["PURGE", "BAN", "PURGEKEYS", "PURGETAGS", "URIBAN"]),
                                name in prop::sample::select(vec!["x-url", "x-host", "x-content-type", "xkey-purge",
                                    "xkey-softpurge", "x-cache-tags", "cache-tags", "surrogate-key",
                                    "x-magento-tags-pattern", "x-purge-method", "soft-purge"]),
                                value in "[ -~]{0,64}",
                                path in "/[ -~]{0,32}") {
            let mut r = RequestHeader::build(method, b"/", None).unwrap();
            if r.append_header(name, value.as_str()).is_ok() {
                let _ = parse(&r, "h", &path);
            }
        }
    }
}

#[test]
fn purgebyid_matches_x_ids_involved() {
    let p = parse_req("PURGE", "/@@purgebyid/uuid-9", &[]).unwrap();
    assert!(
        matches!(&p.target, Target::Tags(t) if t == &["uuid-9".to_string()]),
        "{p:?}"
    );
    let v = Validity::default();
    let before = SystemTime::now() - Duration::from_secs(10);
    v.record(&p, now_stamp());
    let hit = |h: &str| v.verdict("h", "/", &entry(&[("x-ids-involved", h)], before));
    assert_eq!(hit("#uuid-1#uuid-9#"), Some(ForcedFreshness::ForceMiss));
    assert_eq!(hit("#uuid-1#uuid-90#"), None);
}

#[test]
fn a_checked_entry_skips_the_records_it_was_checked_against() {
    let v = Validity::default();
    let before = SystemTime::now() - Duration::from_secs(10);
    let headers = http::HeaderMap::new();
    v.record(&parse_req("BAN", "/", &[("x-url", "^/a")]).unwrap(), now_stamp());
    let upto = v.published();
    assert_eq!(
        v.check("h", "/a", before, corral_id(), &headers, 0),
        Verdict::Invalid
    );
    assert_eq!(
        v.check("h", "/b", before, corral_id(), &headers, 0),
        Verdict::Valid
    );
    // /b was checked up to `upto`; a later ban is still checked, the old one is not
    assert_eq!(
        v.check("h", "/a", before, corral_id(), &headers, upto),
        Verdict::Valid
    );
    v.record(&parse_req("BAN", "/", &[("x-url", "^/b")]).unwrap(), now_stamp());
    assert_eq!(
        v.check("h", "/b", before, corral_id(), &headers, upto),
        Verdict::Invalid
    );
}

#[test]
fn a_record_pulled_late_still_applies_by_its_own_time() {
    let v = Validity::default();
    let headers = http::HeaderMap::new();
    let t0 = SystemTime::now() - Duration::from_secs(100);
    v.record(
        &parse_req("BAN", "/", &[("x-url", "^/new")]).unwrap(),
        now_stamp(),
    );
    // another corral's ban from 50 s ago arrives now: it sorts before the newer one
    v.record(
        &parse_req("BAN", "/", &[("x-url", "^/old")]).unwrap(),
        t0 + Duration::from_secs(50),
    );
    assert_eq!(
        v.check("h", "/old", t0, corral_id(), &headers, 0),
        Verdict::Invalid
    );
    assert_eq!(
        v.check(
            "h",
            "/old",
            t0 + Duration::from_secs(60),
            corral_id(),
            &headers,
            0
        ),
        Verdict::Valid,
        "validated after it"
    );
    assert_eq!(
        v.check("h", "/new", t0, corral_id(), &headers, 0),
        Verdict::Invalid
    );
}

#[test]
fn records_expire_only_past_the_check_mark_and_the_horizon() {
    let v = Validity::default();
    let t = |s: u64| UNIX_EPOCH + Duration::from_secs(1_000_000 + s);
    for (i, at) in [(0, t(10)), (1, t(20)), (2, t(30))] {
        v.record(
            &parse_req("BAN", "/", &[("x-url", &format!("^/{i}"))]).unwrap(),
            at,
        );
    }
    v.record(
        &parse_req("PURGEKEYS", "/", &[("xkey-purge", "k")]).unwrap(),
        t(40),
    );
    assert_eq!(v.len(), 4);
    // checked up to the third record, but an entry validated at t(15) may still arrive
    assert_eq!(v.expire(3, t(15), t(15)), 1);
    assert_eq!(v.len(), 3);
    assert_eq!(
        v.expire(3, t(100), t(100)),
        2,
        "the tag record (seq 4) was not checked yet"
    );
    assert_eq!(v.len(), 1);
    assert!(v.active());
    assert_eq!(v.expire(4, t(100), t(100)), 1);
    assert!(
        v.is_empty() && !v.active(),
        "nothing left to check: the fast path is back"
    );
}

#[test]
fn the_floor_goes_once_swept_past() {
    let v = Validity::default();
    let headers = http::HeaderMap::new();
    let old = SystemTime::now() - Duration::from_secs(10);
    v.invalidate_all_before(now_stamp());
    assert_eq!(
        v.check("h", "/", old, corral_id(), &headers, u64::MAX),
        Verdict::Invalid
    );
    assert_eq!(v.expire(v.published(), old, old), 0);
    assert!(
        v.floor_ms() > 0,
        "an entry validated before the floor may still arrive"
    );
    assert_eq!(
        v.expire(
            v.published(),
            SystemTime::now() + Duration::from_secs(1),
            SystemTime::now() + Duration::from_secs(1)
        ),
        0
    );
    assert_eq!(v.floor_ms(), 0);
    assert_eq!(v.check("h", "/", old, corral_id(), &headers, 0), Verdict::Valid);
}

#[test]
fn url_records_cover_every_variant_and_expire_with_l1_when_hard() {
    let v = Validity::default();
    let headers = http::HeaderMap::new();
    let old = SystemTime::now() - Duration::from_secs(60);
    // accepted 11 s ago: the L2 delete that follows a hard one has surely landed
    let at = SystemTime::now() - Duration::from_secs(11);
    v.record(&parse_req("PURGE", "/a?x=1", &[]).unwrap(), at);
    v.record(&parse_req("PURGE", "/s", &[("soft-purge", "1")]).unwrap(), at);
    // one accepted just now is kept whatever L1 says, for the L2 delete that follows it
    v.record(&parse_req("PURGE", "/now", &[]).unwrap(), now_stamp());
    assert_eq!(
        v.check("www.example.org", "/a?x=1", old, corral_id(), &headers, 0),
        Verdict::Invalid
    );
    assert_eq!(
        v.check("www.example.org", "/a", old, corral_id(), &headers, 0),
        Verdict::Valid
    );
    assert!(matches!(
        v.check("www.example.org", "/s", old, corral_id(), &headers, 0),
        Verdict::Stale(_)
    ));
    // L1 swept, but memcached may hold values for a day: the old hard one (its L2 copy was
    // deleted) goes, the soft one (its L2 copy stays, stale) and the new hard one are kept
    let now = SystemTime::now() + Duration::from_secs(1);
    assert_eq!(v.expire(v.published(), now, old), 1);
    assert!(matches!(
        v.check("www.example.org", "/s", old, corral_id(), &headers, 0),
        Verdict::Stale(_)
    ));
    assert_eq!(
        v.check("www.example.org", "/now", old, corral_id(), &headers, 0),
        Verdict::Invalid
    );
}

#[test]
fn the_log_names_what_a_purge_targets() {
    let text = |m: &str, p: &str, h: &[(&str, &str)]| parse_req(m, p, h).unwrap().target_text();
    assert_eq!(text("PURGE", "/a?b=1", &[]), "www.example.org/a?b=1");
    assert_eq!(
        text("BAN", "/", &[("x-url", "^/news/"), ("x-content-type", "html")]),
        "url~^/news/ content-type~html"
    );
    assert_eq!(text("PURGEKEYS", "/", &[("xkey-purge", "b a")]), "a b");
    assert_eq!(
        text("PURGE", "/", &[("x-magento-tags-pattern", "cat_p_1")]),
        "x-magento-tags~cat_p_1"
    );
    let long = "t".repeat(300);
    let t = text("PURGEKEYS", "/", &[("xkey-purge", &long)]);
    assert!(t.chars().count() <= 201 && t.ends_with('…'), "{t}");
}

#[test]
fn both_magento_headers_make_one_purge_of_two_patterns_that_survives_the_log() {
    let p = parse_req(
        "PURGE",
        "/",
        &[("x-magento-tags-pattern", "cat_p_1"), ("x-pool", "^static$")],
    )
    .unwrap();
    assert_eq!(p.target_text(), "x-magento-tags~cat_p_1 x-pool~^static$");
    let rec = LogRecord::of(&p, now_stamp()).unwrap();
    let (back, _) = LogRecord::decode(&rec.encode()).unwrap();
    assert_eq!(back.target_text(), p.target_text());
    let v = Validity::default();
    v.record(&back, now_stamp());
    let before = SystemTime::now() - Duration::from_secs(10);
    assert!(v
        .verdict("h", "/", &entry(&[("x-pool", "static")], before))
        .is_some());
    assert!(v
        .verdict("h", "/", &entry(&[("x-magento-tags", "cat_p_1")], before))
        .is_some());
    assert!(v
        .verdict("h", "/", &entry(&[("x-pool", "pages")], before))
        .is_none());
}

/// See: issue 10, item 4. A purge another corral accepted covers what this corral validated
/// up to `clock_skew` after it (their clocks may disagree that much); on one clock, no margin.
#[test]
fn another_corrals_purge_covers_what_was_validated_within_the_clock_skew() {
    let v = Validity::default().with_skew(Duration::from_secs(1));
    let headers = http::HeaderMap::new();
    let at = SystemTime::now();
    let other = corral_id() + 1;
    let url = parse_req("PURGE", "/p", &[]).unwrap();
    v.record_by(&url, at, other);
    let just_after = at + Duration::from_millis(500);
    let well_after = at + Duration::from_millis(1500);
    assert_eq!(
        v.check("www.example.org", "/p", just_after, corral_id(), &headers, 0),
        Verdict::Invalid
    );
    assert_eq!(
        v.check("www.example.org", "/p", well_after, corral_id(), &headers, 0),
        Verdict::Valid
    );
    // validated on the purging corral's own clock: compared as is
    assert_eq!(
        v.check("www.example.org", "/p", just_after, other, &headers, 0),
        Verdict::Valid
    );
    // the same for a ban, found through the time-sorted list
    let ban = parse_req("BAN", "/", &[("x-url", "^/b$")]).unwrap();
    v.record_by(&ban, at, other);
    assert_eq!(
        v.check("www.example.org", "/b", just_after, corral_id(), &headers, 0),
        Verdict::Invalid
    );
    assert_eq!(
        v.check("www.example.org", "/b", just_after, other, &headers, 0),
        Verdict::Valid
    );
}

/// Found by the torture test: a tag record read late from the log, older than the one kept
/// for the same tag, replaced it and shortened what the tag's purges cover.
#[test]
fn an_older_record_for_the_same_tag_does_not_shorten_what_it_covers() {
    let v = Validity::default().with_skew(Duration::from_secs(1));
    let headers = {
        let mut h = http::HeaderMap::new();
        h.insert("xkey", "p3".parse().unwrap());
        h
    };
    let now = SystemTime::now();
    let tag = parse_req("PURGEKEYS", "/", &[("xkey-purge", "p3")]).unwrap();
    v.record(&tag, now);
    v.record_by(&tag, now - Duration::from_secs(5), corral_id() + 1);
    let copy = now - Duration::from_millis(100);
    assert_eq!(
        v.check("h", "/x", copy, corral_id(), &headers, 0),
        Verdict::Invalid
    );
}
