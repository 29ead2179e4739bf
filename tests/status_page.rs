//! The admin status page (`GET /` on the admin listener) against the real binary: one
//! self-contained HTML document under a strict CSP, rendered by headless Chromium from the
//! JSON endpoints (`/stats`, `/stats/memcached`, `/peers`, `/bus`, `/recent`).
//!
//! The browser test needs Chromium on PATH (Debian's `chromium` package; `./x test` installs
//! it); without it the test fails with that message rather than skipping.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:";

/// The ids the page promises (the spec's list, and the error banner).
const IDS: [&str; 11] = [
    "hit-ratio",
    "req-rate",
    "l1-bytes",
    "l1-entries",
    "memory-bytes",
    "memcached",
    "peers",
    "recent",
    "version",
    "uptime",
    "error",
];

/// A Chromium run may take this long (a debug corral and a browser on 2 busy cores).
const BROWSER_LIMIT: Duration = Duration::from_secs(60);

/// `chromium` or `chromium-browser`, whichever is on PATH.
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "neither `chromium` nor `chromium-browser` is on PATH: this test renders the admin \
         status page in headless Chromium. Install Debian's `chromium` package \
         (apt-get install chromium) or run `./x test`, which does"
    );
}

/// What one headless Chromium run printed.
struct Browser {
    stdout: String,
    stderr: String,
}

/// Run headless Chromium with `args` (the URL last), its profile and output under `dir`;
/// killed (with every process it started) after [`BROWSER_LIMIT`].
async fn browse(dir: &Path, budget_ms: u32, args: Vec<String>) -> Browser {
    let bin = chromium();
    let dir = dir.to_path_buf();
    let run = tokio::task::spawn_blocking(move || -> Result<Browser, String> {
        std::fs::create_dir_all(&dir).unwrap();
        let (out, err) = (dir.join("stdout"), dir.join("stderr"));
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let mut child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--no-proxy-server",
                "--hide-scrollbars",
                // console messages (script errors, CSP refusals) go to stderr
                "--enable-logging=stderr",
                "--v=0",
            ])
            .arg(format!("--virtual-time-budget={budget_ms}"))
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            // its own process group, so a timeout kills the renderers too
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let deadline = Instant::now() + BROWSER_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = Command::new("kill")
                    .args(["-KILL", "--"])
                    .arg(format!("-{}", child.id()))
                    .status();
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "chromium did not finish in {BROWSER_LIMIT:?} (killed); stderr:\n{}",
                    read(err.as_path())
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !status.success() {
            return Err(format!(
                "chromium failed ({status}); stderr:\n{}",
                read(err.as_path())
            ));
        }
        Ok(Browser {
            stdout: read(out.as_path()),
            stderr: read(err.as_path()),
        })
    })
    .await
    .unwrap();
    run.unwrap_or_else(|e| panic!("{e}"))
}

/// Where the element with `id` starts, and where its opening tag ends.
fn locate(dom: &str, id: &str) -> (usize, usize) {
    let at = dom
        .find(&format!(" id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap() + 1;
    (start, end)
}

/// The opening tag of the element with `id`.
fn open_tag<'a>(dom: &'a str, id: &str) -> &'a str {
    let (start, end) = locate(dom, id);
    &dom[start..end]
}

/// The value of attribute `name` on the element with `id`.
fn attr(dom: &str, id: &str, name: &str) -> String {
    let tag = open_tag(dom, id);
    let key = format!(" {name}=\"");
    let at = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} on #{id}: {tag}"))
        + key.len();
    tag[at..].split('"').next().unwrap().to_string()
}

/// The markup inside the element with `id`, up to its matching closing tag.
fn inner<'a>(dom: &'a str, id: &str) -> &'a str {
    let (start, end) = locate(dom, id);
    let name: String = dom[start + 1..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let (open, close) = (format!("<{name}"), format!("</{name}>"));
    let (mut depth, mut at) = (1, end);
    loop {
        let next_close = dom[at..]
            .find(&close)
            .unwrap_or_else(|| panic!("#{id} is not closed"))
            + at;
        // a nested element of the same name opens before this close
        let next_open = dom[at..next_close]
            .match_indices(&open)
            .map(|(i, _)| i + at)
            .find(|&i| matches!(dom.as_bytes().get(i + open.len()).copied(), Some(b' ' | b'>')));
        match next_open {
            Some(i) => {
                depth += 1;
                at = i + open.len();
            }
            None => {
                depth -= 1;
                if depth == 0 {
                    return &dom[end..next_close];
                }
                at = next_close + close.len();
            }
        }
    }
}

/// Text without tags.
fn text(markup: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in markup.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

async fn purge(url: &str) -> Got {
    send(
        client().request(reqwest::Method::from_bytes(b"PURGE").unwrap(), url),
        &[],
    )
    .await
}

#[tokio::test]
async fn the_status_page_shows_what_the_admin_endpoints_say() {
    let origin = Origin::start().await;
    for path in ["/status/cached", "/status/purged"] {
        origin.route(path, |s| {
            Reply::ok(format!("v{}", s.n)).header("cache-control", "max-age=300")
        });
    }
    let proxy = Proxy::start(origin.addr, Conf::default()).await;
    let admin = format!("http://{}", proxy.admin);

    // a miss then hits, one more entry, and a purge of it
    let first = get(&proxy.url("/status/cached")).await;
    assert!(first.cache.contains("fwd=miss"), "{}", first.cache);
    for _ in 0..2 {
        let hit = get(&proxy.url("/status/cached")).await;
        assert!(hit.cache.starts_with("corral; hit"), "{}", hit.cache);
    }
    get(&proxy.url("/status/purged")).await;
    let purged = purge(&proxy.url("/status/purged")).await;
    assert_eq!(purged.status, 200, "{}", purged.body);
    eventually(Duration::from_secs(5), "the purge listed in /recent", || {
        let url = format!("{admin}/recent");
        async move { get(&url).await.body.contains("/status/purged") }
    })
    .await;
    let (entries, _, memory) = proxy.stats().await;
    assert!(entries >= 1, "/stats counts the cached entry");

    let dir = tempfile::tempdir().unwrap();
    let page = browse(
        &dir.path().join("dom"),
        6000,
        vec!["--dump-dom".into(), format!("{admin}/")],
    )
    .await;
    let dom = page.stdout.as_str();
    assert!(dom.contains("</html>"), "no page dumped:\n{dom}\n{}", page.stderr);

    // no script error, no CSP refusal
    let console: Vec<&str> = page
        .stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .filter(|l| {
            l.contains("Uncaught") || l.contains("Refused to") || l.contains("Content Security Policy")
        })
        .collect();
    assert!(
        console.is_empty(),
        "the page logged errors:\n{}",
        console.join("\n")
    );
    assert!(
        open_tag(dom, "error").contains(" hidden"),
        "the error banner is shown: {}",
        text(inner(dom, "error"))
    );

    assert_eq!(attr(dom, "l1-entries", "data-value"), entries.to_string());
    assert_eq!(text(inner(dom, "l1-entries")).trim(), entries.to_string());
    assert_eq!(attr(dom, "memory-bytes", "data-value"), memory.to_string());
    let bytes: u64 = attr(dom, "l1-bytes", "data-value").parse().unwrap();
    assert!(bytes > 0, "L1 holds the cached entry");
    let version = text(inner(dom, "version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "#version: {version}");
    assert!(
        inner(dom, "recent").contains("/status/purged"),
        "#recent: {}",
        text(inner(dom, "recent"))
    );
    let ratio = attr(dom, "hit-ratio", "data-value");
    let ratio: f64 = ratio
        .parse()
        .unwrap_or_else(|_| panic!("#hit-ratio data-value {ratio:?} is not a number"));
    assert!(ratio > 0.0 && ratio <= 1.0, "hit ratio {ratio} after 2 hits");
    assert!(!text(inner(dom, "uptime")).trim().is_empty());

    // the screenshot (docs/status-page.png with CORRAL_SCREENSHOT=1), with some traffic while
    // the page polls so the sparklines have a line
    let shot = if std::env::var("CORRAL_SCREENSHOT").as_deref() == Ok("1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        docs.join("status-page.png")
    } else {
        dir.path().join("status-page.png")
    };
    let _ = std::fs::remove_file(&shot);
    let traffic = {
        let (hit, miss) = (proxy.url("/status/cached"), proxy.url("/status/page"));
        tokio::spawn(async move {
            for i in 0u64.. {
                let url = if i % 8 == 0 {
                    format!("{miss}?n={i}")
                } else {
                    hit.clone()
                };
                get(&url).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let run = browse(
        &dir.path().join("shot"),
        30_000,
        vec![
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,900".into(),
            format!("{admin}/"),
        ],
    )
    .await;
    traffic.abort();
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10 * 1024,
        "screenshot {} is {size} bytes:\n{}",
        shot.display(),
        run.stderr
    );
}

#[tokio::test]
async fn the_status_page_is_one_self_contained_document() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default()).await;
    let page = get(&format!("http://{}/", proxy.admin)).await;
    assert_eq!(page.status, 200);
    let header = |name: &str| {
        page.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no {name} header"))
    };
    assert!(
        header("content-type").starts_with("text/html"),
        "{}",
        header("content-type")
    );
    // the spec's policy exactly (directive order and spacing aside): nothing else allowed
    let directives = |csp: &str| {
        let mut d: Vec<String> = csp
            .split(';')
            .map(|d| d.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|d| !d.is_empty())
            .collect();
        d.sort();
        d
    };
    assert_eq!(directives(&header("content-security-policy")), directives(CSP));
    assert_eq!(header("cache-control"), "no-store");
    assert_eq!(
        page.body,
        include_str!("../src/admin/status.html"),
        "served as written"
    );

    // nothing loaded from elsewhere: no URL outside comments
    for external in [
        "src=\"http",
        "href=\"http",
        "url(http",
        "src='http",
        "href='http",
        "@import",
    ] {
        assert!(!page.body.contains(external), "the page loads {external}…");
    }
    let mut uncommented = String::new();
    let mut rest = page.body.as_str();
    while let Some(at) = rest.find("<!--") {
        uncommented.push_str(&rest[..at]);
        rest = rest[at..].split_once("-->").map_or("", |(_, after)| after);
    }
    uncommented.push_str(rest);
    for scheme in ["http://", "https://", "//fonts.", "//cdn"] {
        assert!(!uncommented.contains(scheme), "a {scheme} URL in the page");
    }
    // no eval: the CSP forbids it
    assert!(!page.body.contains("eval(") && !page.body.contains("new Function"));
    for id in IDS {
        assert!(page.body.contains(&format!(" id=\"{id}\"")), "#{id} in the page");
    }
}
