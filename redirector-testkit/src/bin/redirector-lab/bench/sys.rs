//! Reading the few numbers the bench takes from /proc.
use anyhow::{anyhow, Context as _, Result};

/// A numeric field of a /proc file: `VmRSS`, `VmHWM` of `status` (KiB), `memlock` of an fdinfo.
pub fn proc_field(path: &str, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    field(&text, key).with_context(|| format!("{path}: field {key}"))
}

/// A numeric `key:\tvalue…` line of a /proc file (fdinfo, status).
pub fn field(text: &str, key: &str) -> Result<u64> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .ok_or_else(|| anyhow!("no line `{key}:`"))?;
    let value = line.split_whitespace().next().unwrap_or("");
    value.parse().with_context(|| format!("value {value:?} of `{key}` is not a number"))
}

/// The 1-minute load average, to tell a busy machine from an idle one.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_fields() {
        let status = "Name:\tx\nVmHWM:\t  5120 kB\nVmRSS:\t  4096 kB\n";
        assert_eq!(field(status, "VmRSS").unwrap(), 4096);
        assert_eq!(field("pos:\t0\nmemlock:\t8192\n", "memlock").unwrap(), 8192);
        assert!(field(status, "VmSwap").is_err());
        assert!(field("memlock:\tlots\n", "memlock").is_err());
        assert!(proc_field("/proc/self/status", "VmRSS").unwrap() > 0);
    }
}
