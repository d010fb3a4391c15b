//! The few numbers the bench takes from /proc, and CPU affinity.
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

/// The CPUs the calling thread may run on (at the bench's start: the
/// process's affinity mask).
pub fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is the empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    // SAFETY: CPU_ISSET reads the set filled above.
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect();
    if cpus.is_empty() {
        return Err(anyhow!("sched_getaffinity returned no CPU"));
    }
    Ok(cpus)
}

/// Lets thread `tid` (0: the calling thread) run only on `cpus`, as
/// `taskset -p` does.
pub fn set_affinity(tid: i32, cpus: &[usize]) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET adds to it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: sched_setaffinity reads the set built above.
    if unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("sched_setaffinity({tid}, {cpus:?})"));
    }
    Ok(())
}

/// `kernel.bpf_stats_enabled`: 1 while anyone holds a `BPF_ENABLE_STATS`
/// fd or has set the sysctl (the kernel reports its static key), so a
/// round meant to run without the statistics can tell that it did not.
pub fn bpf_stats_enabled() -> Option<bool> {
    let v = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok()?;
    Some(v.trim() != "0")
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

    #[test]
    fn pins_a_thread_and_lets_it_go_again() {
        let all = allowed_cpus().unwrap();
        let last = *all.last().unwrap();
        std::thread::spawn(move || {
            set_affinity(0, &[last]).unwrap();
            assert_eq!(allowed_cpus().unwrap(), vec![last]);
            set_affinity(0, &all).unwrap();
            assert_eq!(allowed_cpus().unwrap(), all);
        })
        .join()
        .unwrap();
    }
}
