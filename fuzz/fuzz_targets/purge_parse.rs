//! Fuzz the purge request parser: any method, header set and target must give a purge or a
//! reason, never a panic.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run purge_parse -- -max_total_time=60` (from the repo root).
#![no_main]

use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 5] = ["PURGE", "BAN", "PURGEKEYS", "PURGETAGS", "URIBAN"];
const HEADERS: [&str; 13] = [
    "x-url", "x-host", "x-content-type", "xkey-purge", "xkey-softpurge", "x-cache-tags", "cache-tags",
    "surrogate-key", "x-magento-tags-pattern", "x-pool", "x-purge-method", "soft-purge", "fastly-soft-purge",
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let method = METHODS[first as usize % METHODS.len()];
    let mut parts = rest.split(|b| *b == 0);
    let path = String::from_utf8_lossy(parts.next().unwrap_or(b"/")).to_string();
    let Ok(mut req) = pingora_http::RequestHeader::build(method, b"/", None) else { return };
    for (i, value) in parts.enumerate() {
        let name = HEADERS[i % HEADERS.len()];
        if let Ok(v) = std::str::from_utf8(value) {
            let _ = req.append_header(name, v);
        }
    }
    let _ = corral::purge::parse(&req, "www.example.org", &path);
});
