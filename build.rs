//! Link corral's release binary with its functions in the order a profile ran them
//! (`link/symbol-order.txt`, written by `benches/link-order.sh`): the code that serves
//! requests lies together, so fewer of the binary's pages are mapped. The binary's code is
//! about 11 MiB of a running corral's RSS otherwise (issue 16: RSS against `memory_bytes`,
//! README "Where the RSS at α 0.8 goes").
//!
//! Only for release builds on x86_64 Linux with rustc 1.90 or later, whose default linker
//! there is LLD (its `--symbol-ordering-file`), and only when no other linker is asked for;
//! `CORRAL_LINK_ORDER=0` leaves it out. A symbol of the list that the build does not have (the
//! code or a dependency changed since the list was written) is left where it is, without a
//! warning: a stale list costs memory, never the build.

use std::env;
use std::path::Path;
use std::process::Command;

const ORDER: &str = "link/symbol-order.txt";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={ORDER}");
    println!("cargo:rerun-if-env-changed=CORRAL_LINK_ORDER");
    println!("cargo:rerun-if-env-changed=RUSTFLAGS");
    if why_not().is_some() {
        return;
    }
    let order = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join(ORDER);
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// Why the order is not given to the linker, if it is not.
fn why_not() -> Option<String> {
    let var = |k: &str| env::var(k).unwrap_or_default();
    if var("CORRAL_LINK_ORDER") == "0" {
        return Some("CORRAL_LINK_ORDER=0".into());
    }
    if var("PROFILE") != "release" {
        return Some("not a release build".into());
    }
    if var("TARGET") != "x86_64-unknown-linux-gnu" || var("HOST") != var("TARGET") {
        return Some(format!("target {}: its linker may not be LLD", var("TARGET")));
    }
    // another linker asked for (flags, or cargo's linker setting given by the environment)
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    if flags.contains("linker")
        || flags.contains("fuse-ld")
        || !var("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_empty()
    {
        return Some("another linker is set".into());
    }
    if !Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
        .join(ORDER)
        .is_file()
    {
        return Some(format!("no {ORDER}"));
    }
    // LLD is rustc's default linker on x86_64-unknown-linux-gnu from 1.90
    let version = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let minor = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok());
    match minor {
        Some(m) if version.starts_with("rustc 1.") && m >= 90 => None,
        _ => Some(format!("{}: not known to link with LLD", version.trim())),
    }
}
