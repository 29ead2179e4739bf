use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_str(text, "t.toml")
}

#[test]
fn embedded_default_is_valid_and_memory_only() {
    let c = Config::embedded_default();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:6081");
    assert_eq!(c.cache.default_ttl, Duration::ZERO);
    assert!(c.rules.is_empty());
}

#[test]
fn empty_file_gives_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.upstream.address, "127.0.0.1:8080");
    assert_eq!(c.upstream.sni, "127.0.0.1");
    assert_eq!(c.cache.memory_bytes, 256 * 1024 * 1024);
}

#[test]
fn readable_values() {
    let c = parse("[cache]\nmemory_bytes = \"64MiB\"\ngrace = \"1m 30s\"\n").unwrap();
    assert_eq!(c.cache.memory_bytes, 64 * 1024 * 1024);
    assert_eq!(c.cache.grace, Duration::from_secs(90));
}

#[test]
fn unknown_key_names_the_key() {
    let e = parse("[cache]\ngrase = \"10s\"\n").unwrap_err();
    assert_eq!(e.file, "t.toml");
    assert_eq!(e.key, "cache.grase");
    assert!(e.reason.contains("unknown field"), "{e}");
}

#[test]
fn unknown_section_is_refused() {
    let e = parse("[cahce]\n").unwrap_err();
    assert!(e.reason.contains("unknown field"), "{e}");
}

#[test]
fn bad_duration_names_the_key() {
    let e = parse("[cache]\ngrace = \"10x\"\n").unwrap_err();
    assert_eq!(e.key, "cache.grace");
    let e = parse("[[rule]]\npath_prefix = \"/a\"\nttl = \"soon\"\n").unwrap_err();
    assert_eq!(e.key, "rule[0].ttl");
}

#[test]
fn the_allocator_trim_is_on_by_default_and_a_bool() {
    assert!(parse("").unwrap().cache.trim_allocator);
    assert!(
        !parse("[cache]\ntrim_allocator = false\n")
            .unwrap()
            .cache
            .trim_allocator
    );
    let e = parse("[cache]\ntrim_allocator = \"yes\"\n").unwrap_err();
    assert_eq!(e.key, "cache.trim_allocator");
}

#[test]
fn bad_size_names_the_key() {
    let e = parse("[cache]\nmemory_bytes = \"lots\"\n").unwrap_err();
    assert_eq!(e.key, "cache.memory_bytes");
}

#[test]
fn bad_addresses_are_refused() {
    assert_eq!(
        parse("[server]\nlisten = \"nonsense\"\n").unwrap_err().key,
        "server.listen"
    );
    assert_eq!(
        parse("[upstream]\naddress = \"example.org\"\n").unwrap_err().key,
        "upstream.address"
    );
    assert_eq!(
        parse("[upstream]\naddress = \":80\"\n").unwrap_err().key,
        "upstream.address"
    );
    let e = parse("[server]\nlisten = \"127.0.0.1:7000\"\nadmin = \"127.0.0.1:7000\"\n").unwrap_err();
    assert_eq!(e.key, "server.admin");
}

#[test]
fn not_toml_is_refused() {
    let e = parse("[cache\n").unwrap_err();
    assert_eq!(e.key, "-");
    assert!(e.to_string().starts_with("t.toml: -: "), "{e}");
}

#[test]
fn impossible_values_are_refused() {
    assert_eq!(
        parse("[server]\nthreads = 0\n").unwrap_err().key,
        "server.threads"
    );
    assert_eq!(
        parse("[cache]\nlock_timeout = \"0s\"\n").unwrap_err().key,
        "cache.lock_timeout"
    );
    let e = parse("[cache]\nmemory_bytes = \"1MiB\"\nmax_object_bytes = \"2MiB\"\n").unwrap_err();
    assert_eq!(e.key, "cache.max_object_bytes");
    // TinyUFO weighs entries in 16 bits: a larger object would be fetched and thrown away
    let tinyufo = "[cache]\nmemory_bytes = \"1GiB\"\nmax_object_bytes = \"20MiB\"\neviction = \"tinyufo\"\n";
    let e = parse(tinyufo).unwrap_err();
    assert_eq!(e.key, "cache.max_object_bytes");
    assert!(e.to_string().contains("tinyufo"), "{e}");
    let lru = "[cache]\nmemory_bytes = \"1GiB\"\nmax_object_bytes = \"20MiB\"\neviction = \"lru\"\n";
    assert_eq!(parse(lru).unwrap().cache.max_object_bytes, 20 << 20);
    // S3-FIFO (the default) weighs in bytes up to 4 GiB
    let s3fifo = "[cache]\nmemory_bytes = \"1GiB\"\nmax_object_bytes = \"20MiB\"\n";
    assert_eq!(parse(s3fifo).unwrap().cache.max_object_bytes, 20 << 20);
    assert_eq!(parse("[log]\nlevel = \"loud[\"\n").unwrap_err().key, "log.level");
}

#[test]
fn memcached_section() {
    assert!(parse("").unwrap().memcached.is_none(), "L1 only by default");
    let c =
        parse("[memcached]\nservers = [\"127.0.0.1:11211\", \"mc2:11211\"]\nnamespace = \"site\"\n").unwrap();
    let m = c.memcached.unwrap();
    assert_eq!(m.servers.len(), 2);
    assert_eq!(m.op_timeout, Duration::from_millis(50));
    let e = parse("[memcached]\nservers = [\"127.0.0.1\"]\n").unwrap_err();
    assert_eq!(e.key, "memcached.servers[0]");
    let e = parse("[memcached]\nservers = [\"a:1\"]\nnamespace = \"a b\"\n").unwrap_err();
    assert_eq!(e.key, "memcached.namespace");
    let e = parse("[memcached]\nservers = [\"a:1\"]\nop_timeout = \"0ms\"\n").unwrap_err();
    assert_eq!(e.key, "memcached.op_timeout");
}

#[test]
fn purge_section() {
    let c = parse("").unwrap();
    assert!(
        c.purge.access.permits(Some("127.0.0.1".parse().unwrap()), None),
        "loopback by default"
    );
    assert!(
        !c.purge.access.permits(Some("10.0.0.1".parse().unwrap()), None),
        "nobody else"
    );
    let c = parse("[purge]\nallow = [\"10.0.0.0/8\", \"192.0.2.7\"]\ntoken = \"t\"\nhost_map = { \"cache1:6081\" = \"WWW.example.org\" }\n").unwrap();
    assert!(c
        .purge
        .access
        .permits(Some("192.0.2.7".parse().unwrap()), Some("Bearer t")));
    assert_eq!(c.purge.site_for("cache1:6081"), "www.example.org");
    assert_eq!(c.purge.site_for("other"), "other");
    assert_eq!(
        parse("[purge]\nallow = [\"everyone\"]\n").unwrap_err().key,
        "purge.allow[0]"
    );
}

#[test]
fn bad_rules_are_refused() {
    let e = parse("[[rule]]\npath_prefix = \"static\"\n").unwrap_err();
    assert_eq!(e.key, "rule[0].path_prefix");
    let e = parse("[[rule]]\nhost = \"a.org:80\"\n").unwrap_err();
    assert_eq!(e.key, "rule[0].host");
    let e = parse("[[rule]]\nbypass = true\nttl = \"1m\"\n").unwrap_err();
    assert_eq!(e.key, "rule[0].bypass");
    let e = parse("[[rule]]\nkey_headers = [\"X-Ok\", \"bad name\"]\n").unwrap_err();
    assert_eq!(e.key, "rule[0].key_headers[1]");
    let e = parse("[[rule]]\nkey_headers = [\"Connection\"]\n").unwrap_err();
    assert_eq!(e.key, "rule[0].key_headers[0]");
    let e = parse("[[rule]]\nkey_headers = [\"X-A\", \"x-a\"]\n").unwrap_err();
    assert!(e.reason.contains("twice"), "{e}");
    let c = parse("[[rule]]\nkey_headers = [\"X-Forwarded-Proto\"]\n").unwrap();
    assert_eq!(c.rules[0].key_headers[0].as_str(), "x-forwarded-proto");
}

#[test]
fn unbindable_listen_address_is_refused() {
    // 192.0.2.1 (TEST-NET-1) is never a local address: bind fails with EADDRNOTAVAIL
    let c = parse("[server]\nlisten = \"192.0.2.1:6081\"\nadmin = \"\"\n").unwrap();
    assert_eq!(c.check_bindable().unwrap_err().key, "server.listen");
}

#[test]
fn first_matching_rule_wins() {
    let c = parse(
        "[[rule]]\nhost = \"*.example.org\"\npath_prefix = \"/admin\"\nbypass = true\n\
         [[rule]]\npath_prefix = \"/static/\"\nttl = \"1h\"\n\
         [[rule]]\nhost = \"Example.org\"\nttl = \"1m\"\n",
    )
    .unwrap();
    assert!(c.rule_for("www.example.org", "/admin/x").unwrap().bypass);
    assert_eq!(
        c.rule_for("example.org", "/admin/x").unwrap().ttl,
        Some(Duration::from_secs(60))
    );
    assert_eq!(
        c.rule_for("other.net", "/static/a.css").unwrap().ttl,
        Some(Duration::from_secs(3600))
    );
    assert!(c.rule_for("other.net", "/").is_none());
    // the wildcard needs a real subdomain label
    assert!(c.rule_for("xexample.org", "/admin").is_none());
}

#[test]
fn purge_invariant_settings_are_checked() {
    let c = parse("").unwrap();
    assert_eq!(c.purge.clock_skew, Duration::from_secs(1));
    assert_eq!(c.purge.max_unconfirmed, Duration::from_secs(2));
    assert!(!c.purge.acknowledge_cluster);
    assert!(
        parse("[purge]\nacknowledge = \"cluster\"\n")
            .unwrap()
            .purge
            .acknowledge_cluster
    );
    for (text, key) in [
        ("[purge]\nacknowledge = \"everyone\"\n", "purge.acknowledge"),
        ("[purge]\nmax_unconfirmed = \"100ms\"\n", "purge.max_unconfirmed"),
        ("[purge]\nclock_skew = \"5m\"\n", "purge.clock_skew"),
        ("[purge]\nclock_offset_ms = 7200000\n", "purge.clock_offset_ms"),
    ] {
        let e = parse(text).unwrap_err();
        assert_eq!(e.key, key, "{e}");
    }
}

#[test]
fn peers_are_off_by_default_and_the_keys_have_their_documented_defaults() {
    let c = parse("").unwrap();
    assert!(c.peers.peers.is_empty());
    assert_eq!(c.peers.token, None);
    assert_eq!(c.peers.timeout, Duration::from_secs(1));
    assert_eq!(c.peers.retry_delay, Duration::from_secs(30));
    assert_eq!(c.peers.backlog, 10_000);
}

#[test]
fn a_corral_recognises_its_own_address_among_its_peers() {
    let c = parse(
        "[server]\nlisten = \"127.0.0.1:6081\"\n[peers]\ntoken = \"s\"\n\
         urls = [\"http://127.0.0.1:6081\", \"http://127.0.0.1:6091\"]\n",
    )
    .unwrap();
    let own: Vec<bool> = c.peers.peers.iter().map(|p| p.is_self).collect();
    assert_eq!(own, vec![true, false]);
    // a wildcard listen address: every address of this machine on that port is this corral
    let c = parse("[server]\nlisten = \"0.0.0.0:6081\"\n[peers]\ntoken = \"s\"\nurls = [\"http://127.0.0.1:6081\", \"http://127.0.0.1:7000\"]\n").unwrap();
    let own: Vec<bool> = c.peers.peers.iter().map(|p| p.is_self).collect();
    assert_eq!(own, vec![true, false]);
}

#[test]
fn bad_peer_settings_name_the_key() {
    let bad = [
        (
            "[peers]\nurls = [\"http://127.0.0.1:6091\"]\n",
            "peers.token",
            "required",
        ),
        (
            "[peers]\ntoken = \"s\"\nurls = [\"ftp://127.0.0.1:6091\"]\n",
            "peers.urls[0]",
            "http://",
        ),
        (
            "[peers]\ntoken = \"s\"\nurls = [\"http://127.0.0.1:6091/x\"]\n",
            "peers.urls[0]",
            "no path",
        ),
        (
            "[peers]\ntoken = \"s\"\nurls = [\"http://127.0.0.1:6091\", \"http://127.0.0.1:6091/\"]\n",
            "peers.urls[1]",
            "twice",
        ),
        (
            "[peers]\ntoken = \"s\"\nurls = [\"http://no-such-host.invalid:6091\"]\n",
            "peers.urls[0]",
            "resolve",
        ),
        ("[peers]\ntoken = \"a b\"\n", "peers.token", "spaces"),
        (
            "[peers]\ntoken = \"s\"\nurls = [\"http://u:secret@127.0.0.1:6091\"]\n",
            "peers.urls[0]",
            "no user or password",
        ),
        ("[peers]\ntimeout = \"1ms\"\n", "peers.timeout", "10ms"),
        ("[peers]\nretry_delay = \"1ms\"\n", "peers.retry_delay", "100ms"),
        ("[peers]\nbacklog = 0\n", "peers.backlog", "1..="),
        ("[peers]\nurl = []\n", "peers.url", "unknown field"),
    ];
    for (text, key, reason) in bad {
        let e = parse(text).unwrap_err();
        assert_eq!(e.key, key, "{text}: {e}");
        assert!(e.reason.contains(reason), "{text}: {e}");
    }
}

#[test]
fn generation_settings_are_off_by_default_and_checked() {
    let c = parse("").unwrap();
    assert!(c.generation.header.is_none() && c.generation.poll.is_none());
    assert_eq!(c.generation.interval, Duration::from_secs(5));
    assert_eq!(c.generation.settle, Duration::from_secs(10));
    let c = parse("[generation]\nheader = \"X-Generation\"\nurl = \"http://www.example.org/_gen?x=1\"\nwebhooks = [\"http://127.0.0.1:9/hook\"]\n").unwrap();
    assert_eq!(c.generation.header.unwrap().as_str(), "x-generation");
    assert_eq!(
        c.generation.poll,
        Some(("/_gen?x=1".into(), "www.example.org".into()))
    );
    assert_eq!(c.generation.webhooks[0].path, "/hook");
    let bad = [
        ("[generation]\nheader = \"a b\"\n", "generation.header"),
        ("[generation]\nurl = \"ftp://x/y\"\n", "generation.url"),
        ("[generation]\ninterval = \"1ms\"\n", "generation.interval"),
        ("[generation]\nwebhooks = [\"nope\"]\n", "generation.webhooks[0]"),
    ];
    for (text, key) in bad {
        let e = parse(text).unwrap_err();
        assert_eq!(e.key, key, "{text}: {e}");
    }
}

#[test]
fn bus_settings_are_off_by_default_checked_and_the_url_never_printed() {
    assert!(parse("").unwrap().bus.is_none());
    let c = parse("[bus]\namqp_url = \"amqp://corral:s3cret@127.0.0.1:5672/%2f\"\n").unwrap();
    let bus = c.bus.clone().unwrap();
    assert_eq!(bus.exchange, "corral.purge");
    assert_eq!(bus.queue_max, 100_000);
    assert_eq!(bus.confirm_timeout, Duration::from_secs(2));
    assert_eq!(bus.outbox, 10_000);
    assert!(!format!("{c:?}").contains("s3cret"), "the password is redacted");
    let bad = [
        ("[bus]\namqp_url = \"http://x\"\n", "bus.amqp_url"),
        ("[bus]\namqp_url = \"amqps://x:5671/%2f\"\n", "bus.amqp_url"),
        (
            "[bus]\namqp_url = \"amqp://h/\"\nexchange = \"a b\"\n",
            "bus.exchange",
        ),
        (
            "[bus]\namqp_url = \"amqp://h/\"\nqueue_max = 0\n",
            "bus.queue_max",
        ),
        (
            "[bus]\namqp_url = \"amqp://h/\"\nconfirm_timeout = \"1ms\"\n",
            "bus.confirm_timeout",
        ),
        ("[bus]\namqp_urll = \"amqp://h/\"\n", "bus.amqp_urll"),
    ];
    for (text, key) in bad {
        let e = parse(text).unwrap_err();
        assert_eq!(e.key, key, "{text}: {e}");
    }
}

#[test]
fn host_map_keys_are_normalised_and_duplicates_refused() {
    let c = parse("[purge]\nhost_map = { \"Cache:80\" = \"www.example.org\" }\n").unwrap();
    assert_eq!(c.purge.site_for("cache"), "www.example.org");
    let e = parse("[purge]\nhost_map = { \"cache:80\" = \"a.org\", \"CACHE\" = \"b.org\" }\n").unwrap_err();
    assert!(e.key.starts_with("purge.host_map."), "{e}");
    assert!(e.reason.contains("same host"), "{e}");
}

#[test]
fn url_secrets_are_redacted_whatever_the_password_holds() {
    assert_eq!(
        super::redact_url("amqp://u:p/w@h:5672/%2f", false),
        "amqp://u:<redacted>@h:5672/%2f"
    );
    assert_eq!(
        super::redact_url("http://h/x?token=t", true),
        "http://h/x?<redacted>"
    );
    assert_eq!(super::redact_url("http://h/x", true), "http://h/x");
    assert_eq!(super::redact_url("/path?k=v", true), "/path?<redacted>");
}
