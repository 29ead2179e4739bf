//! RFC 9111 storage and freshness policy: may a response be stored, and for how long is it fresh?
//!
//! Built on pingora-cache's `Cache-Control` parser, with the rules it leaves to the caller:
//! `Set-Cookie`, `Vary: *`, `Expires` relative to `Date`, `Age` from upstream, heuristic
//! freshness, and serve-stale windows that come only from the origin or from corral's `grace`
//! and `stale_if_error` (never a hidden default).
//!
//! The decision order, for a response to a GET or HEAD:
//! 1. status: 206 and 1xx are never stored (corral fetches whole bodies); 304 only as a
//!    revalidation (merged into the stored entry, see `proxy`);
//! 2. `no-store` → not stored; `private` or a request with `Authorization` (unless `public`,
//!    `s-maxage` or `must-revalidate`, §3.5) → not stored unless a rule says `cache_private`;
//! 3. `Set-Cookie` → not stored unless a rule says `cache_set_cookie` (then the stored copy
//!    loses the cookie); `Vary: *` → not stored (it can never match, §4.1);
//! 4. lifetime (§4.2.1): `no-cache` → 0 (stored, revalidated on every use); `s-maxage`;
//!    `max-age`; `Expires` − `Date` (an invalid or repeated `Expires` means already stale,
//!    §5.3); the rule's or the config's `ttl`; heuristic (§4.2.2): 10% of `Date` −
//!    `Last-Modified`, at most [`HEURISTIC_MAX`], only for heuristically cacheable statuses;
//!    otherwise not stored;
//! 5. age (§4.2.3): the upstream's `Age` is subtracted from the lifetime and carried on, so the
//!    `Age` corral sends is the upstream's plus the time corral held it. Corral does not derive an
//!    apparent age from `Date`: origin clocks drift, and a skewed `Date` would expire everything
//!    early (Varnish makes the same choice).

use std::time::{Duration, SystemTime};

use http::{header, StatusCode};
use pingora_cache::cache_control::{CacheControl, InterpretCacheControl};
use pingora_cache::{CacheMeta, NoCacheReason, RespCacheable};
use pingora_http::{RequestHeader, ResponseHeader};

/// The targeted cache-control fields corral obeys (RFC 9213), in order: `cache.targeted_header`
/// if set, then `CDN-Cache-Control`, then `Surrogate-Control` (Fastly's and Akamai's). The first
/// with a valid, non-empty value decides instead of `Cache-Control` and `Expires`.
static TARGETED: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();

/// The standard targets, after the configured one.
const STANDARD_TARGETS: [&str; 2] = ["cdn-cache-control", "surrogate-control"];

/// Set the process's targeted field (`cache.targeted_header`, lower case); once, at start.
pub fn set_targeted_header(own: Option<&str>) {
    let mut list: Vec<&'static str> = Vec::new();
    if let Some(own) = own.filter(|h| !h.is_empty()) {
        list.push(Box::leak(own.to_ascii_lowercase().into_boxed_str()));
    }
    list.extend(STANDARD_TARGETS);
    let _ = TARGETED.set(list);
}

/// The targeted fields, in order.
pub fn targeted_headers() -> &'static [&'static str] {
    TARGETED.get().map_or(&STANDARD_TARGETS[..], |v| &v[..])
}

/// A targeted cache-control field of this process (RFC 9213: `CDN-Cache-Control`,
/// `Surrogate-Control`, or `cache.targeted_header`, set once at start).
pub fn is_targeted(name: &str) -> bool {
    targeted_headers().iter().any(|t| name.eq_ignore_ascii_case(t))
}

/// The cache-control that decides for corral: the first targeted field with a valid,
/// non-empty value (RFC 9213 §2.2), and whether it was one; else `Cache-Control`.
fn deciding_cache_control(resp: &ResponseHeader) -> (Option<CacheControl>, bool) {
    for name in targeted_headers() {
        if let Some(cc) = CacheControl::from_resp_headers_named(name, resp) {
            // Surrogate-Control also carries other things (content="ESI/1.0"): it decides
            // only when it says how long, or not at all
            let decides = if *name == "surrogate-control" {
                cc.has_key("max-age") || cc.no_store()
            } else {
                !cc.directives.is_empty()
            };
            if decides {
                return (Some(cc), true);
            }
        }
    }
    (CacheControl::from_resp_headers(resp), false)
}

/// Upper bound of a heuristic lifetime (RFC 9111 §4.2.2 leaves it to the cache).
pub const HEURISTIC_MAX: Duration = Duration::from_secs(24 * 3600);

/// The policy that applies to one request: the `[cache]` values, overridden by its `[[rule]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    /// Lifetime for responses without an explicit one; zero = heuristics only.
    pub default_ttl: Duration,
    pub grace: Duration,
    pub stale_if_error: Duration,
    pub cache_private: bool,
    pub cache_set_cookie: bool,
}

/// Statuses that are "heuristically cacheable" (RFC 9110 §15.1).
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

fn http_date(value: Option<&http::HeaderValue>) -> Option<SystemTime> {
    let v = value?.to_str().ok()?.trim();
    // IMF-fixdate, and the obsolete RFC 850 and asctime formats (RFC 9110 §5.6.7: recipients
    // MUST accept all three), with names in any case
    httpdate::parse_http_date(v)
        .or_else(|_| httpdate::parse_http_date(&canonical_case(v)))
        .ok()
}

/// Day and month names as the date formats spell them (`Sunday`, `Nov`, `GMT`).
fn canonical_case(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.eq_ignore_ascii_case("gmt") {
            out.push_str("GMT");
        } else {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                out.push(first.to_ascii_uppercase());
                out.extend(chars.map(|c| c.to_ascii_lowercase()));
            }
        }
        word.clear();
    };
    for c in v.chars() {
        if c.is_ascii_alphabetic() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// The largest delta-seconds value (RFC 9111 §1.2.2: anything larger counts as 2^31).
const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// The upstream's `Age` in seconds (§5.1: a non-negative integer). Of a list (`Age: 7200, 0`,
/// or several lines) the first value counts; one too large for a number counts as 2^31 (the
/// entry is stale, not dropped); anything else is ignored.
fn age_value(resp: &ResponseHeader) -> Duration {
    let Some(first) = resp
        .headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
    else {
        return Duration::ZERO;
    };
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return Duration::ZERO;
    }
    let secs = first.parse::<u64>().unwrap_or(u64::MAX).min(MAX_DELTA_SECONDS);
    Duration::from_secs(secs)
}

/// The lifetime given by `Expires` (relative to `Date`, to be immune to clock skew), or `None`
/// when there is no `Expires`. An invalid or repeated `Expires` means "already expired".
fn expires_lifetime(resp: &ResponseHeader, now: SystemTime) -> Option<Duration> {
    let mut all = resp.headers.get_all(header::EXPIRES).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return Some(Duration::ZERO);
    }
    let Some(expires) = http_date(Some(first)) else {
        return Some(Duration::ZERO);
    };
    let date = http_date(resp.headers.get(header::DATE)).unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

fn heuristic_lifetime(resp: &ResponseHeader, now: SystemTime) -> Option<Duration> {
    let last_modified = http_date(resp.headers.get(header::LAST_MODIFIED))?;
    let date = http_date(resp.headers.get(header::DATE)).unwrap_or(now);
    let since = date.duration_since(last_modified).ok()?;
    Some((since / 10).min(HEURISTIC_MAX))
}

/// Decide whether `resp` (the answer to `req`) may be stored, and build its [`CacheMeta`].
///
/// `resp` is the header as it will be stored: headers that must not be stored (`private="x"`
/// fields, `Set-Cookie` under `cache_set_cookie`) are removed from it. `now` is the time the
/// answer is validated as of: when its request left for the origin (the meta's `updated`,
/// what purges are compared with, and the epoch its `Age` counts from).
pub fn response_cacheable(
    req: &RequestHeader,
    mut resp: ResponseHeader,
    eff: &Effective,
    now: SystemTime,
) -> RespCacheable {
    use RespCacheable::Uncacheable;
    let status = resp.status;
    if status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Uncacheable(NoCacheReason::Custom("status"));
    }
    // RFC 9213: a targeted field replaces Cache-Control and Expires for this cache
    let (cc, targeted) = deciding_cache_control(&resp);
    if cc.as_ref().is_some_and(|cc| cc.no_store()) {
        return Uncacheable(NoCacheReason::OriginNotCache);
    }
    if !eff.cache_private {
        if cc.as_ref().is_some_and(|cc| cc.private()) {
            return Uncacheable(NoCacheReason::Custom("private"));
        }
        let authorized = req.headers.contains_key(header::AUTHORIZATION);
        if authorized && !cc.as_ref().is_some_and(|cc| cc.allow_caching_authorized_req()) {
            return Uncacheable(NoCacheReason::Custom("authorization"));
        }
    }
    if resp.headers.contains_key(header::SET_COOKIE) {
        if !eff.cache_set_cookie {
            return Uncacheable(NoCacheReason::Custom("set-cookie"));
        }
        resp.remove_header(&header::SET_COOKIE);
    }
    if crate::key::vary_star(&resp.headers) {
        return Uncacheable(NoCacheReason::Custom("vary-star"));
    }

    let explicit = cc.as_ref().and_then(|cc| cc.fresh_duration()).or_else(|| {
        if targeted {
            None
        } else {
            expires_lifetime(&resp, now)
        }
    });
    let lifetime = match explicit {
        Some(l) => l,
        None if !heuristically_cacheable(status) => return Uncacheable(NoCacheReason::OriginNotCache),
        None if !eff.default_ttl.is_zero() => eff.default_ttl,
        None => match heuristic_lifetime(&resp, now) {
            Some(l) => l,
            None => return Uncacheable(NoCacheReason::OriginNotCache),
        },
    };

    // §4.2.4: no-cache, must-revalidate, proxy-revalidate and s-maxage forbid serving stale
    // unless the origin granted it explicitly; pingora's parser applies the last three.
    let no_cache = cc.as_ref().is_some_and(|cc| cc.no_cache());
    let (grace, stale_if_error) = if no_cache {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (eff.grace, eff.stale_if_error)
    };
    let swr = cc
        .as_ref()
        .and_then(|cc| cc.serve_stale_while_revalidate_duration())
        .unwrap_or(grace);
    let sie = cc
        .as_ref()
        .and_then(|cc| cc.serve_stale_if_error_duration())
        .unwrap_or(stale_if_error);

    if let Some(cc) = &cc {
        cc.strip_private_headers(&mut resp);
    }
    if targeted {
        // the fields Cache-Control says are one user's (private="X-User", no-cache="...") stay
        // out of the stored copy whichever field decided
        if let Some(cc) = CacheControl::from_resp_headers(&resp) {
            cc.strip_private_headers(&mut resp);
        }
    }

    let age = age_value(&resp);
    // never before 1970: the meta is serialised for L2, and such a time does not serialise
    let epoch = now
        .checked_sub(age)
        .filter(|e| *e >= std::time::UNIX_EPOCH)
        .unwrap_or(std::time::UNIX_EPOCH);
    let fresh_until = if lifetime.is_zero() {
        // already stale: it is revalidated before any use
        now - Duration::from_secs(1)
    } else {
        epoch + lifetime
    };
    let mut meta = CacheMeta::new(fresh_until, now, secs(swr), secs(sie), resp);
    if epoch != now {
        meta.set_epoch_override(epoch);
    }
    RespCacheable::Cacheable(meta)
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// Update a stored header with the fields of a 304 that validated it (RFC 9111 §3.2, §4.3.4):
/// each field present in the 304 replaces the stored one, except the framing fields, which
/// describe the 304 itself, and `Vary`, which selected the stored variant.
pub fn merge_not_modified(stored: &mut ResponseHeader, fields: &http::HeaderMap) {
    const KEEP: [header::HeaderName; 5] = [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::CONTENT_RANGE,
        header::VARY,
    ];
    for name in fields.keys() {
        if KEEP.contains(name) {
            continue;
        }
        let mut values = fields.get_all(name).iter();
        if let Some(first) = values.next() {
            let _ = stored.insert_header(name.clone(), first.clone());
        }
        for v in values {
            let _ = stored.append_header(name.clone(), v.clone());
        }
    }
}

/// What the client's request says about using a stored response (RFC 9111 §5.2.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestDirectives {
    /// `no-cache`, `max-age=0` or `Pragma: no-cache` (§5.4): validate before use.
    pub no_cache: bool,
    /// `max-age=N`: a stored response older than N is not acceptable without validation.
    pub max_age: Option<Duration>,
    /// `only-if-cached`: answer from the cache or with 504, never go upstream.
    pub only_if_cached: bool,
}

impl RequestDirectives {
    /// No directive at all: any fresh stored response will do.
    pub fn is_plain(&self) -> bool {
        !self.no_cache && self.max_age.is_none() && !self.only_if_cached
    }

    pub fn parse(req: &RequestHeader) -> Self {
        let Some(cc) = CacheControl::from_req_headers(req) else {
            let pragma_no_cache = req
                .headers
                .get_all(header::PRAGMA)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.split(',').any(|d| d.trim().eq_ignore_ascii_case("no-cache")));
            return RequestDirectives {
                no_cache: pragma_no_cache,
                ..Default::default()
            };
        };
        let max_age = cc.max_age().ok().flatten().map(|s| Duration::from_secs(s.into()));
        RequestDirectives {
            no_cache: cc.no_cache() || max_age == Some(Duration::ZERO),
            max_age,
            only_if_cached: cc.only_if_cached(),
        }
    }

    /// Must a stored response last validated at `updated`, now `age` old, be revalidated before
    /// it is used for this request that arrived at `arrived`?
    ///
    /// A response validated after the request arrived satisfies it: that is what lets
    /// concurrent `no-cache` requests share one revalidation instead of each going upstream.
    pub fn requires_validation(&self, updated: SystemTime, age: Duration, arrived: SystemTime) -> bool {
        if updated >= arrived {
            return false;
        }
        self.no_cache || self.max_age.is_some_and(|max| age > max)
    }
}

/// RFC 9110 §9.2.1: the safe methods; a successful other one invalidates (RFC 9111 §4.4).
pub fn is_safe(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use httpdate::fmt_http_date;

    const EFF: Effective = Effective {
        default_ttl: Duration::ZERO,
        grace: Duration::from_secs(10),
        stale_if_error: Duration::from_secs(300),
        cache_private: false,
        cache_set_cookie: false,
    };

    fn get(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut h = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            h.append_header(k.to_string(), *v).unwrap();
        }
        h
    }

    fn decide(status: u16, headers: &[(&str, &str)], eff: &Effective) -> Option<CacheMeta> {
        match response_cacheable(&get(&[]), resp(status, headers), eff, SystemTime::now()) {
            RespCacheable::Cacheable(m) => Some(m),
            RespCacheable::Uncacheable(_) => None,
        }
    }

    fn ttl(m: &CacheMeta) -> i64 {
        let now = SystemTime::now();
        match m.fresh_until().duration_since(now) {
            Ok(d) => d.as_secs_f64().round() as i64,
            Err(e) => -(e.duration().as_secs_f64().round() as i64),
        }
    }

    #[test]
    fn s_maxage_beats_max_age_beats_expires() {
        let later = fmt_http_date(SystemTime::now() + Duration::from_secs(1000));
        let m = decide(
            200,
            &[("cache-control", "max-age=60, s-maxage=120"), ("expires", &later)],
            &EFF,
        )
        .unwrap();
        assert_eq!(ttl(&m), 120);
        let m = decide(200, &[("cache-control", "max-age=60"), ("expires", &later)], &EFF).unwrap();
        assert_eq!(ttl(&m), 60);
    }

    #[test]
    fn expires_is_relative_to_date() {
        // an origin whose clock is an hour behind: Expires - Date is still 100 s
        let date = SystemTime::now() - Duration::from_secs(3600);
        let m = decide(
            200,
            &[
                ("date", &fmt_http_date(date)),
                ("expires", &fmt_http_date(date + Duration::from_secs(100))),
            ],
            &EFF,
        )
        .unwrap();
        assert_eq!(ttl(&m), 100);
    }

    #[test]
    fn invalid_past_or_repeated_expires_means_stale() {
        for headers in [
            vec![("expires", "0")],
            vec![("expires", "Thu, 01 Jan 1970 00:00:00 GMT")],
            vec![
                ("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
                ("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
            ],
        ] {
            let m = decide(200, &headers, &EFF).unwrap();
            assert!(!m.is_fresh(SystemTime::now()), "{headers:?}");
        }
    }

    #[test]
    fn private_no_store_set_cookie_authorization_are_not_stored() {
        assert!(decide(200, &[("cache-control", "private, max-age=60")], &EFF).is_none());
        assert!(decide(200, &[("cache-control", "no-store, max-age=60")], &EFF).is_none());
        assert!(decide(
            200,
            &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
            &EFF
        )
        .is_none());
        let authorized = get(&[("authorization", "Basic eDp5")]);
        let r = response_cacheable(
            &authorized,
            resp(200, &[("cache-control", "max-age=60")]),
            &EFF,
            SystemTime::now(),
        );
        assert!(!r.is_cacheable());
        let r = response_cacheable(
            &authorized,
            resp(200, &[("cache-control", "public, max-age=60")]),
            &EFF,
            SystemTime::now(),
        );
        assert!(r.is_cacheable());
    }

    #[test]
    fn rules_can_allow_private_and_set_cookie() {
        let eff = Effective {
            cache_private: true,
            cache_set_cookie: true,
            ..EFF
        };
        assert!(decide(200, &[("cache-control", "private, max-age=60")], &eff).is_some());
        let m = decide(
            200,
            &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
            &eff,
        )
        .unwrap();
        assert!(
            m.headers().get("set-cookie").is_none(),
            "the cookie is never stored"
        );
    }

    #[test]
    fn vary_star_is_not_stored() {
        assert!(decide(200, &[("cache-control", "max-age=60"), ("vary", "*")], &EFF).is_none());
    }

    #[test]
    fn no_explicit_lifetime_uses_default_ttl_then_heuristic() {
        assert!(decide(200, &[], &EFF).is_none(), "nothing to go on: not stored");
        let eff = Effective {
            default_ttl: Duration::from_secs(30),
            ..EFF
        };
        assert_eq!(ttl(&decide(200, &[], &eff).unwrap()), 30);
        let now = SystemTime::now();
        let lm = fmt_http_date(now - Duration::from_secs(1000));
        let m = decide(
            200,
            &[("last-modified", &lm), ("date", &fmt_http_date(now))],
            &EFF,
        )
        .unwrap();
        assert_eq!(ttl(&m), 100);
        // heuristics only for heuristically cacheable statuses
        assert!(decide(302, &[("last-modified", &lm)], &EFF).is_none());
        assert!(decide(500, &[], &eff).is_none());
        // but an explicit lifetime makes any final status storable
        assert!(decide(302, &[("cache-control", "max-age=5")], &EFF).is_some());
    }

    #[test]
    fn heuristic_is_capped() {
        let lm = fmt_http_date(SystemTime::now() - Duration::from_secs(400 * 24 * 3600));
        let m = decide(200, &[("last-modified", &lm)], &EFF).unwrap();
        assert_eq!(ttl(&m), HEURISTIC_MAX.as_secs() as i64);
    }

    #[test]
    fn expires_is_read_in_every_format_and_case() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        for expires in [
            "Sun, 06 Nov 1994 08:51:17 GMT",
            "Sunday, 06-Nov-94 08:51:17 GMT",
            "Sun Nov  6 08:51:17 1994",
            "SUN, 06 NOV 1994 08:51:17 GMT",
            "sunday, 06-nov-94 08:51:17 gmt",
        ] {
            let m = decide(200, &[("date", date), ("expires", expires)], &EFF)
                .unwrap_or_else(|| panic!("{expires}: not stored"));
            assert_eq!(ttl(&m), 100, "{expires}");
        }
    }

    #[test]
    fn a_targeted_field_decides_instead_of_cache_control() {
        // a fresh CDN-Cache-Control beats Cache-Control: no-store
        let m = decide(
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=120"),
            ],
            &EFF,
        )
        .unwrap();
        assert_eq!(ttl(&m), 120);
        // and private / no-store in it keep the response out
        assert!(decide(
            200,
            &[("cache-control", "max-age=60"), ("cdn-cache-control", "private")],
            &EFF
        )
        .is_none());
        assert!(decide(
            200,
            &[("cache-control", "max-age=60"), ("cdn-cache-control", "no-store")],
            &EFF
        )
        .is_none());
        // Surrogate-Control without a lifetime (ESI) leaves Cache-Control in charge
        let m = decide(
            200,
            &[
                ("cache-control", "max-age=40"),
                ("surrogate-control", "content=\"ESI/1.0\""),
            ],
            &EFF,
        )
        .unwrap();
        assert_eq!(ttl(&m), 40);
        // Surrogate-Control's max-age, as Fastly and Akamai users send it
        let m = decide(
            200,
            &[
                ("cache-control", "max-age=5"),
                ("surrogate-control", "max-age=300"),
            ],
            &EFF,
        )
        .unwrap();
        assert_eq!(ttl(&m), 300);
        // CDN-Cache-Control comes before Surrogate-Control
        let m = decide(
            200,
            &[
                ("cdn-cache-control", "max-age=50"),
                ("surrogate-control", "max-age=300"),
            ],
            &EFF,
        )
        .unwrap();
        assert_eq!(ttl(&m), 50);
        // Expires is ignored when a targeted field decides
        let d = httpdate::fmt_http_date(SystemTime::now());
        let e = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(900));
        let m = decide(
            200,
            &[("date", &d), ("expires", &e), ("cdn-cache-control", "max-age=30")],
            &EFF,
        )
        .unwrap();
        assert_eq!(ttl(&m), 30);
    }

    #[test]
    fn partial_and_interim_are_never_stored() {
        assert!(decide(206, &[("cache-control", "max-age=60")], &EFF).is_none());
        assert!(decide(304, &[("cache-control", "max-age=60")], &EFF).is_none());
    }

    #[test]
    fn upstream_age_is_subtracted_and_carried() {
        let m = decide(200, &[("cache-control", "max-age=100"), ("age", "30")], &EFF).unwrap();
        assert_eq!(ttl(&m), 70);
        assert_eq!(m.age().as_secs(), 30);
        let m = decide(200, &[("cache-control", "max-age=100"), ("age", "500")], &EFF).unwrap();
        assert!(!m.is_fresh(SystemTime::now()));
        let m = decide(200, &[("cache-control", "max-age=100"), ("age", "-5")], &EFF).unwrap();
        assert_eq!(m.age().as_secs(), 0, "a malformed Age is ignored");
        // a list: the first value
        let m = decide(200, &[("cache-control", "max-age=100"), ("age", "7200, 0")], &EFF).unwrap();
        assert!(!m.is_fresh(SystemTime::now()), "Age: 7200, 0 is 7200");
        // too large for a number: stale, not dropped
        let huge = "99999999999999999999999999";
        let m = decide(200, &[("cache-control", "max-age=100"), ("age", huge)], &EFF).unwrap();
        assert!(!m.is_fresh(SystemTime::now()));
    }

    #[test]
    fn stale_windows_come_from_origin_or_config_only() {
        let m = decide(200, &[("cache-control", "max-age=1")], &EFF).unwrap();
        assert_eq!(m.stale_while_revalidate_sec(), 10);
        assert_eq!(m.stale_if_error_sec(), 300);
        let m = decide(
            200,
            &[(
                "cache-control",
                "max-age=1, stale-while-revalidate=3, stale-if-error=7",
            )],
            &EFF,
        )
        .unwrap();
        assert_eq!((m.stale_while_revalidate_sec(), m.stale_if_error_sec()), (3, 7));
        let m = decide(200, &[("cache-control", "max-age=1, must-revalidate")], &EFF).unwrap();
        assert_eq!((m.stale_while_revalidate_sec(), m.stale_if_error_sec()), (0, 0));
        let m = decide(200, &[("cache-control", "no-cache")], &EFF).unwrap();
        assert!(!m.is_fresh(SystemTime::now()));
        assert_eq!((m.stale_while_revalidate_sec(), m.stale_if_error_sec()), (0, 0));
        let none = Effective {
            grace: Duration::ZERO,
            ..EFF
        };
        assert_eq!(
            decide(200, &[("cache-control", "max-age=1")], &none)
                .unwrap()
                .stale_while_revalidate_sec(),
            0
        );
    }

    #[test]
    fn private_field_names_are_stripped() {
        let m = decide(
            200,
            &[
                ("cache-control", "max-age=60, private=\"x-user\""),
                ("x-user", "bob"),
            ],
            &EFF,
        );
        // a qualified `private` still marks the whole response private for pingora's parser
        assert!(m.is_none() || m.unwrap().headers().get("x-user").is_none());
    }

    #[test]
    fn a_304_replaces_every_field_but_framing_and_vary() {
        let mut stored = resp(
            200,
            &[
                ("etag", "\"1\""),
                ("x-rev", "1"),
                ("content-length", "10"),
                ("vary", "accept"),
            ],
        );
        let fresh = resp(
            304,
            &[
                ("x-rev", "2"),
                ("x-new", "a"),
                ("x-new", "b"),
                ("content-length", "0"),
                ("vary", "*"),
            ],
        );
        merge_not_modified(&mut stored, &fresh.headers);
        assert_eq!(stored.headers["x-rev"], "2");
        assert_eq!(stored.headers.get_all("x-new").iter().count(), 2);
        assert_eq!(stored.headers["content-length"], "10");
        assert_eq!(stored.headers["vary"], "accept");
        assert_eq!(stored.headers["etag"], "\"1\"");
    }

    #[test]
    fn request_directives() {
        assert!(RequestDirectives::parse(&get(&[("cache-control", "no-cache")])).no_cache);
        assert!(RequestDirectives::parse(&get(&[("cache-control", "max-age=0")])).no_cache);
        assert!(RequestDirectives::parse(&get(&[("pragma", "no-cache")])).no_cache);
        let d = RequestDirectives::parse(&get(&[("cache-control", "max-age=5, only-if-cached")]));
        assert_eq!(d.max_age, Some(Duration::from_secs(5)));
        assert!(d.only_if_cached && !d.no_cache);
        assert_eq!(RequestDirectives::parse(&get(&[])), RequestDirectives::default());
    }

    #[test]
    fn a_response_validated_after_the_request_arrived_satisfies_no_cache() {
        let d = RequestDirectives::parse(&get(&[("cache-control", "no-cache")]));
        let now = SystemTime::now();
        assert!(d.requires_validation(now - Duration::from_secs(1), Duration::from_secs(1), now));
        assert!(!d.requires_validation(now + Duration::from_millis(5), Duration::ZERO, now));
        let d = RequestDirectives::parse(&get(&[("cache-control", "max-age=10")]));
        assert!(!d.requires_validation(now - Duration::from_secs(5), Duration::from_secs(5), now));
        assert!(d.requires_validation(now - Duration::from_secs(50), Duration::from_secs(50), now));
    }
}
