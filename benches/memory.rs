//! Memory per cached token: the growth of the resident set while a million tokens are loaded into
//! the layer's cache, divided by their number. The store keeps only hashes and makes each record
//! when asked, as a database would, so the growth is the cache's.
//!
//! `cargo bench --bench memory`

mod common;

/// The resident set size of this process, from `/proc/self/status` (Linux).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn main() {
    let n = if common::full_run() {
        1_000_000
    } else {
        10_000
    };
    let rt = common::runtime();
    let (store, secrets) = common::ManyTokens::issue(n);
    let layer = common::layer(store);
    // One token first, so that what exists once per cache is in the baseline.
    rt.block_on(common::fill(&layer, &secrets[..1]));
    let Some(before) = rss_bytes() else {
        println!("memory: no /proc/self/status on this system; nothing measured");
        return;
    };
    let started = std::time::Instant::now();
    rt.block_on(common::fill(&layer, &secrets[1..]));
    let after = rss_bytes().unwrap_or(before);
    assert_eq!(layer.cached_tokens(), n);
    let per_token = (after.saturating_sub(before)) as f64 / (n - 1) as f64;
    println!("== memory of the verification cache ==");
    println!(
        "  {n} tokens cached in {:.1?}; resident set {:.1} MiB -> {:.1} MiB",
        started.elapsed(),
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    println!("  {per_token:.0} bytes per cached token (target ≤ 400)");
}
