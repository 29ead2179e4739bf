//! Link corral's release binary with its functions in the order a profile ran them
//! (`link/symbol-order.txt`, written by `benches/link-order.sh`): the code that serves
//! requests lies together, so fewer of the binary's pages are mapped. The binary's code is
//! about 11 MiB of a running corral's RSS otherwise (issue 16: RSS against `memory_bytes`,
//! README "Where the RSS at α 0.8 goes").
//!
//! Only for release builds for the machine itself, and only if the linker takes the order: an
//! empty program is linked first with the same compiler, flags and linker and the order's two
//! options (LLD's `--symbol-ordering-file`; rustup's rustc links with LLD on x86_64 Linux
//! since 1.90, GNU ld and gold refuse the option). `CORRAL_LINK_ORDER=0` leaves it out. A
//! symbol of the list that the build does not have (the code, a dependency or rustc changed
//! since the list was written: its first line names the rustc) is left where it is, without a
//! warning from the linker: a stale list costs memory, never the build, and this script warns
//! when the list was written by another rustc, or for another `Cargo.lock` (its second line:
//! the dependencies' versions are in the names' hashes too).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const ORDER: &str = "link/symbol-order.txt";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for var in [
        "CORRAL_LINK_ORDER",
        "RUSTC_LINKER",
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let order = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join(ORDER);
    if order.is_file() {
        // (a path that does not exist would run this script again at every build)
        println!("cargo:rerun-if-changed={ORDER}");
        println!("cargo:rerun-if-changed=Cargo.lock");
    }
    match why_not(&order) {
        // (shown by cargo build -vv)
        Some(why) => eprintln!("corral: link order not used: {why}"),
        None => {
            for arg in order_args(&order) {
                println!("cargo:rustc-link-arg-bins={arg}");
            }
            warn_if_stale(&order);
        }
    }
}

/// The linker options that give it the order (`-Xlinker`: a path with a comma stays whole).
fn order_args(order: &Path) -> [String; 4] {
    [
        "-Xlinker".into(),
        format!("--symbol-ordering-file={}", order.display()),
        "-Xlinker".into(),
        "--no-warn-symbol-ordering".into(),
    ]
}

/// Why the order is not given to the linker, if it is not.
fn why_not(order: &Path) -> Option<String> {
    let var = |k: &str| env::var(k).unwrap_or_default();
    if var("CORRAL_LINK_ORDER") == "0" {
        return Some("CORRAL_LINK_ORDER=0".into());
    }
    if var("PROFILE") != "release" {
        return Some("not a release build".into());
    }
    if var("HOST") != var("TARGET") {
        return Some("a cross build".into());
    }
    if !order.is_file() {
        return Some(format!("no {ORDER}"));
    }
    let out = PathBuf::from(var("OUT_DIR"));
    let probe = out.join("link_order_probe.rs");
    if std::fs::write(&probe, "fn main() {}\n").is_err() {
        return Some("cannot write the probe".into());
    }
    let mut rustc = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    rustc.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    if let Ok(linker) = env::var("RUSTC_LINKER") {
        rustc.arg(format!("-Clinker={linker}"));
    }
    rustc
        .args([
            "--edition=2021",
            "--crate-type=bin",
            "--target",
            &var("TARGET"),
            "-o",
        ])
        .arg(out.join("link_order_probe"))
        .arg(&probe);
    for arg in order_args(order) {
        rustc.arg(format!("-Clink-arg={arg}"));
    }
    match rustc.output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "the linker refuses it: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .take(3)
                .collect::<Vec<_>>()
                .join(" / ")
        )),
        Err(e) => Some(format!("cannot run rustc: {e}")),
    }
}

/// A warning (shown by cargo) when the list's first line names another rustc than this one,
/// or its second line another `Cargo.lock` (a fingerprint: FNV-1a, 64 bits, as
/// `benches/link-order.sh` computes it).
fn warn_if_stale(order: &Path) {
    let Ok(text) = std::fs::read_to_string(order) else {
        return;
    };
    let mut lines = text.lines();
    let written = lines
        .next()
        .and_then(|l| l.strip_prefix("# "))
        .unwrap_or_default();
    let now = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let stale = |what: String| {
        println!(
            "cargo:warning={ORDER} was written for {what}: its names are stale, and RSS is about \
             2-3 MiB higher until benches/link-order.sh writes it again"
        )
    };
    if !written.is_empty() && now.trim() != written.trim() {
        stale(format!("{written}, this is {}", now.trim()));
    }
    let lock = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join("Cargo.lock");
    if let (Some(was), Ok(lock)) = (
        lines.next().and_then(|l| l.strip_prefix("# Cargo.lock fnv1a64 ")),
        std::fs::read(lock),
    ) {
        let is = format!("{:016x}", fnv1a64(&lock));
        if was.trim() != is {
            stale(format!("another Cargo.lock ({was}, this one is {is})"));
        }
    }
}

/// FNV-1a, 64 bits: a fingerprint of `Cargo.lock` that the Python of `benches/link-order.sh`
/// computes the same way without a dependency.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
