//! Parsing `--devices`: `cpu`, `cpu:N` (N CPU slots), or `cuda:0,1,...`; and each slot's memory,
//! reported at registration so the coordinator can refuse a round that fits no device.

/// The device slots a `--devices` value names.
pub fn parse_devices(spec: &str) -> Result<Vec<String>, String> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(vec!["cpu".into()]);
    }
    if let Some(n) = spec.strip_prefix("cpu:") {
        let n: usize = n
            .parse()
            .map_err(|_| format!("--devices {spec:?}: expected cpu:N with N a number"))?;
        if n == 0 {
            return Err(format!("--devices {spec:?}: N must be at least 1"));
        }
        return Ok((0..n).map(|i| format!("cpu:{i}")).collect());
    }
    if let Some(list) = spec.strip_prefix("cuda:") {
        let mut out = Vec::new();
        for part in list.split(',') {
            let i: u32 = part.trim().parse().map_err(|_| {
                format!("--devices {spec:?}: {part:?} is not a GPU index (try cuda:0,1)")
            })?;
            let d = format!("cuda:{i}");
            if out.contains(&d) {
                return Err(format!("--devices {spec:?}: GPU {i} is named twice"));
            }
            out.push(d);
        }
        return Ok(out);
    }
    Err(format!(
        "--devices {spec:?}: use cpu, cpu:N or cuda:0,1,..."
    ))
}

/// Bytes of memory of each device slot, for `RegisterRequest.device_memory` (0 = unknown).
/// CPU slots share the host's memory (`MemTotal`, or the cgroup's limit when lower), split
/// evenly between them since their tasks may run at once. CUDA devices report 0: their size is
/// not queried yet (the default build has no CUDA, and the `cuda` build's query is not written).
pub fn device_memory(devices: &[String]) -> Vec<u64> {
    let cpu_slots = devices
        .iter()
        .filter(|d| *d == "cpu" || d.starts_with("cpu:"))
        .count() as u64;
    let host = host_memory().unwrap_or(0);
    devices
        .iter()
        .map(|d| {
            if (d == "cpu" || d.starts_with("cpu:")) && cpu_slots > 0 {
                host / cpu_slots
            } else {
                0
            }
        })
        .collect()
}

/// The memory this process may use: `MemTotal`, or the cgroup's limit when lower.
pub fn host_memory() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| mem_total(&t))?;
    let limit = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .find_map(|t| cgroup_limit(&t));
    Some(limit.map_or(total, |l| l.min(total)))
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// A cgroup memory limit (`memory.max` of v2: bytes or `max`; `memory.limit_in_bytes` of v1:
/// bytes, a huge number when unlimited), `None` when there is none.
fn cgroup_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    // v1 reports "unlimited" as a page-rounded i64::MAX.
    (v < (1u64 << 60)).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists() {
        assert_eq!(parse_devices("cpu").unwrap(), vec!["cpu"]);
        assert_eq!(parse_devices("cpu:2").unwrap(), vec!["cpu:0", "cpu:1"]);
        assert_eq!(parse_devices("cuda:0,1").unwrap(), vec!["cuda:0", "cuda:1"]);
        for bad in ["gpu", "cuda:", "cuda:0,0", "cpu:0", "cuda:x"] {
            assert!(parse_devices(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn memory_of_meminfo_and_cgroup_limits() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_576_000 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(cgroup_limit("max\n"), None);
        assert_eq!(cgroup_limit("8589934592\n"), Some(8 << 30));
        assert_eq!(cgroup_limit("9223372036854771712\n"), None);
    }

    #[test]
    fn cpu_slots_share_the_host_and_gpus_are_unknown() {
        let host = host_memory().expect("Linux has /proc/meminfo");
        assert!(host > 0);
        let two: Vec<String> = vec!["cpu:0".into(), "cpu:1".into()];
        assert_eq!(device_memory(&two), vec![host / 2, host / 2]);
        assert_eq!(device_memory(&["cpu".to_string()]), vec![host]);
        assert_eq!(device_memory(&["cuda:0".to_string()]), vec![0]);
    }
}
