//! Helpers shared by the fuzz targets in `fuzz_targets/`: one Tokio runtime per process, and
//! small pools of addresses that make trusted-proxy and restriction matches likely.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use arbitrary::Arbitrary;

/// Runs `future` to completion on this process's one current-thread Tokio runtime.
pub fn block_on<F: Future>(future: F) -> F::Output {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a current-thread Tokio runtime")
        })
        .block_on(future)
}

/// Addresses the targets configure as trusted proxies, restrictions or clients, so that the
/// fuzzer reaches the interesting branches without guessing 128-bit values.
pub const POOL: &[&str] = &[
    "10.0.0.1",
    "10.1.2.3",
    "192.0.2.7",
    "192.0.2.200",
    "198.51.100.9",
    "127.0.0.1",
    "::1",
    "2001:db8::7",
    "2001:db8:1::1",
    "fd00::1",
    "::ffff:10.0.0.5",
    "::ffff:192.0.2.7",
    "::ffff:198.51.100.9",
    "0.0.0.0",
    "::",
];

/// An address: one of [`POOL`], or any IPv4 or IPv6 address.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// An index into [`POOL`].
    Pool(u8),
    /// Any IPv4 address.
    V4([u8; 4]),
    /// Any IPv6 address.
    V6([u8; 16]),
}

impl Addr {
    /// The address.
    pub fn ip(self) -> IpAddr {
        match self {
            Addr::Pool(i) => POOL[usize::from(i) % POOL.len()]
                .parse()
                .expect("the pool holds addresses"),
            Addr::V4(b) => IpAddr::V4(Ipv4Addr::from(b)),
            Addr::V6(b) => IpAddr::V6(Ipv6Addr::from(b)),
        }
    }
}

/// `ip` with an IPv4-mapped IPv6 address turned into its IPv4 address, the form the crate
/// reports client addresses in.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}
