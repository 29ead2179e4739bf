//! The binary and its configuration: `--check`, and every bad config is a clear error, a
//! non-zero exit, and no port bound.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::process::{Command, Output};

use common::{corral_bin, free_port};

fn run(args: &[&str]) -> Output {
    Command::new(corral_bin())
        .args(args)
        .output()
        .expect("run corral")
}

fn with_file(text: &str, args: &[&str]) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_string();
    let mut all = vec!["-c", path.as_str()];
    all.extend_from_slice(args);
    (run(&all), path)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn shipped_config_checks_ok() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/corral.toml");
    let out = run(&["--check", "-c", path]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("is valid"), "{}", stderr(&out));
}

/// `--check` prints the effective config: the file with every default filled in, as TOML that
/// reads back as the same config, secrets redacted.
#[test]
fn check_prints_the_effective_config_with_defaults_and_no_secret() {
    let (out, _) = with_file(
        "[purge]\ntoken = \"s3cret\"\n[cache]\ngrace = \"3s\"\n",
        &["--check"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(printed.contains("grace = \"3s\""), "{printed}");
    // a default the file did not set
    assert!(printed.contains("memory_bytes = 268435456"), "{printed}");
    assert!(
        !printed.contains("s3cret") && printed.contains("token = \"<redacted>\""),
        "{printed}"
    );
    // what it prints is a config corral reads (the redacted token is a token too)
    let (again, _) = with_file(&printed, &["--check"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(String::from_utf8_lossy(&again.stdout), printed);
}

#[test]
fn each_bad_config_names_file_key_and_reason() {
    let cases: &[(&str, &str, &str)] = &[
        ("[cache]\ngrase = \"10s\"\n", "cache.grase", "unknown field"),
        (
            "[cache]\ngrace = \"10 parsecs\"\n",
            "cache.grace",
            "expected a duration",
        ),
        (
            "[cache]\nmemory_bytes = \"a lot\"\n",
            "cache.memory_bytes",
            "expected a size like",
        ),
        (
            "[cache]\nlock_timeout = \"0s\"\n",
            "cache.lock_timeout",
            "greater than 0",
        ),
        (
            "[server]\nlisten = \"not an address\"\n",
            "server.listen",
            "invalid address",
        ),
        (
            "[server]\nlisten = \"192.0.2.1:6081\"\nadmin = \"\"\n",
            "server.listen",
            "cannot bind",
        ),
        (
            "[upstream]\naddress = \"no-port\"\n",
            "upstream.address",
            "host:port",
        ),
        (
            "[[rule]]\npath_prefix = \"nope\"\n",
            "rule[0].path_prefix",
            "must start with '/'",
        ),
        (
            "[server]\nheader_timeout = \"0s\"\n",
            "server.header_timeout",
            "at least 10ms",
        ),
        (
            "[server]\nmax_connections = 0\n",
            "server.max_connections",
            "greater than 0",
        ),
        (
            "[upstream]\nfirst_byte_timeout = \"soon\"\n",
            "upstream.first_byte_timeout",
            "invalid",
        ),
        (
            "[upstream]\nmax_connections = 0\n",
            "upstream.max_connections",
            "greater than 0",
        ),
        ("[server\n", "-", "TOML parse error"),
    ];
    for (text, key, reason) in cases {
        for check in [true, false] {
            let args: &[&str] = if check { &["--check"] } else { &[] };
            let (out, path) = with_file(text, args);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{text:?}: {err}");
            assert!(
                err.contains(&format!("{path}: {key}: ")),
                "{text:?} should name {path} and {key}: {err}"
            );
            assert!(err.contains(reason), "{text:?} should say {reason:?}: {err}");
        }
    }
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = run(&["-c", "/nonexistent/corral.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/nonexistent/corral.toml: -: cannot read"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_bad_config_binds_nothing() {
    // a valid listen address, but a bad key later in the file: the port must stay free
    let port = free_port();
    let (out, _) = with_file(
        &format!("[server]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"\"\n[cache]\nbogus = 1\n"),
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    TcpListener::bind(("127.0.0.1", port)).expect("the port was never taken");
}

#[test]
fn check_accepts_a_port_in_use_by_the_running_server() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (out, _) = with_file(
        &format!("[server]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"\"\n"),
        &["--check"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_listen_port_already_taken_is_refused_before_starting() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (out, _) = with_file(
        &format!("[server]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"\"\n"),
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("server.listen: cannot bind"),
        "{}",
        stderr(&out)
    );
}
