//! Parsing `--devices`: `cpu`, `cpu:N` (N CPU slots), or `cuda:0,1,...`.

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
}
