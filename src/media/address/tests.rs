use std::collections::HashMap;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn only_global_addresses_pass_by_default() {
    let rule = AddressRule::default();
    let refused = [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback /8"),
        ("::1", "IPv6 loopback"),
        ("10.1.2.3", "private 10/8"),
        ("172.16.0.1", "private 172.16/12"),
        ("172.31.255.254", "private 172.16/12, top"),
        ("192.168.1.1", "private 192.168/16"),
        ("169.254.169.254", "link-local: cloud metadata"),
        ("fe80::1", "IPv6 link-local"),
        ("fd00:ec2::254", "unique local (AWS's IPv6 metadata)"),
        ("fc00::1", "unique local fc00::/7"),
        ("0.0.0.0", "unspecified"),
        ("::", "IPv6 unspecified"),
        ("0.1.2.3", "this network 0/8"),
        ("100.64.0.1", "shared address space"),
        ("255.255.255.255", "broadcast"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "IPv6 multicast"),
        ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
        ("::ffff:169.254.169.254", "IPv4-mapped metadata"),
        ("::ffff:10.0.0.1", "IPv4-mapped private"),
        ("::127.0.0.1", "IPv4-compatible loopback"),
        ("64:ff9b::a00:1", "NAT64 of 10.0.0.1"),
        ("2002:7f00:1::", "6to4 of 127.0.0.1"),
        ("2001:db8::1", "documentation"),
        ("192.0.2.1", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("fec0::1", "site-local"),
    ];
    for (address, class) in refused {
        assert!(!rule.permits(ip(address)), "{address} ({class}) must be refused");
    }
    let allowed = [
        "8.8.8.8",
        "1.1.1.1",
        "172.32.0.1",
        "100.128.0.1",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
    ];
    for address in allowed {
        assert!(rule.permits(ip(address)), "{address} is global");
    }
}

#[test]
fn the_flag_allows_everything_and_networks_allow_their_own() {
    let all = AddressRule {
        allow_private: true,
        allowed_networks: vec![],
    };
    assert!(all.permits(ip("127.0.0.1")) && all.permits(ip("169.254.169.254")) && all.permits(ip("::1")));
    let store = AddressRule {
        allow_private: false,
        allowed_networks: vec!["10.1.0.0/16".parse().unwrap()],
    };
    assert!(store.permits(ip("10.1.2.3")));
    assert!(
        store.permits(ip("::ffff:10.1.2.3")),
        "mapped addresses are checked as IPv4"
    );
    assert!(!store.permits(ip("10.2.0.1")));
    assert!(!store.permits(ip("169.254.169.254")));
}

#[test]
fn ip_literals_in_urls_are_checked_in_every_spelling() {
    let rule = AddressRule::default();
    let refused = [
        "http://127.0.0.1/x.png",
        "http://2130706433/x.png",
        "http://0x7f.1/x.png",
        "http://0177.0.0.1/x.png",
        "http://[::1]:8080/x.png",
        "http://[::ffff:7f00:1]/x.png",
        "https://169.254.169.254/latest/meta-data/",
        "http://0/x.png",
    ];
    for url in refused {
        let parsed = reqwest::Url::parse(url).unwrap();
        assert!(
            matches!(rule.check_url(&parsed), Err(MediaError::AddressNotAllowed(_))),
            "{url}"
        );
    }
    for url in [
        "http://8.8.8.8/x.png",
        "http://example.com/x.png",
        "http://[2606:4700::1111]/x.png",
    ] {
        assert_eq!(rule.check_url(&reqwest::Url::parse(url).unwrap()), Ok(()), "{url}");
    }
}

/// Answers from a table, as a hostile DNS server would.
struct Stub(HashMap<&'static str, Vec<&'static str>>);

impl Lookup for Stub {
    fn lookup(&self, host: String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let addrs = self.0.get(host.as_str()).map(|a| {
            a.iter()
                .map(|s| SocketAddr::new(s.parse().unwrap(), 0))
                .collect::<Vec<_>>()
        });
        Box::pin(async move { addrs.ok_or_else(|| std::io::Error::other("no such name")) })
    }
}

fn resolver(rule: AddressRule) -> GuardedResolver {
    let table = HashMap::from([
        ("public.test", vec!["93.184.216.34"]),
        ("metadata.test", vec!["169.254.169.254"]),
        ("mixed.test", vec!["10.0.0.7", "93.184.216.34", "::1"]),
        (
            "private-only.test",
            vec!["192.168.0.2", "fd12::1", "::ffff:127.0.0.1", "::"],
        ),
        ("nothing.test", vec![]),
    ]);
    GuardedResolver {
        lookup: Arc::new(Stub(table)),
        rule,
    }
}

#[tokio::test]
async fn the_resolver_hands_on_only_permitted_addresses() {
    let guarded = resolver(AddressRule::default());
    let only = |addrs: Vec<SocketAddr>| addrs.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>();
    assert_eq!(
        only(guarded.resolve_checked("public.test").await.unwrap()),
        ["93.184.216.34"]
    );
    // A rebinding answer that mixes in private addresses connects only to the public one.
    assert_eq!(
        only(guarded.resolve_checked("mixed.test").await.unwrap()),
        ["93.184.216.34"]
    );
    for name in ["metadata.test", "private-only.test"] {
        let err = guarded.resolve_checked(name).await.unwrap_err();
        assert!(
            matches!(err, MediaError::AddressNotAllowed(ref m) if m.starts_with(name)),
            "{err:?}"
        );
    }
    assert!(matches!(
        guarded.resolve_checked("nothing.test").await,
        Err(MediaError::FetchFailed(_))
    ));
    assert!(matches!(
        guarded.resolve_checked("unknown.test").await,
        Err(MediaError::FetchFailed(_))
    ));
    let open = resolver(AddressRule {
        allow_private: true,
        allowed_networks: vec![],
    });
    assert_eq!(only(open.resolve_checked("private-only.test").await.unwrap()).len(), 4);
}
