//! The memory budget: how much secure memory the normal world lets the
//! secure world hold, and what the system has available (the management
//! right of Flex-Mem).

/// How much secure memory the normal world lets the secure world hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryBudget {
    Bytes(u64),
    /// Three quarters of the memory available when the secure world starts.
    Auto,
}

impl MemoryBudget {
    /// Parses `auto`, or a size as [`parse_size`] reads it.
    pub fn parse(text: &str) -> std::result::Result<MemoryBudget, String> {
        if text.trim().eq_ignore_ascii_case("auto") {
            return Ok(MemoryBudget::Auto);
        }
        parse_size(text).map(MemoryBudget::Bytes)
    }

    pub(crate) fn bytes(self) -> u64 {
        match self {
            MemoryBudget::Bytes(b) => b,
            MemoryBudget::Auto => available_memory().map_or(4 << 30, |a| a / 4 * 3),
        }
    }
}

/// Parses a memory size: a whole number of bytes, or a whole number
/// followed by K, M, G or T (binary units: "M", "MB" and "MiB" all mean
/// 2^20). Whole numbers only, so the result is exact; one that does not fit
/// in 64 bits is an error, not a wrapped value.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("memory size {text:?}: expected a whole number of bytes or e.g. 512M, 2G"));
    }
    let value: u64 = digits.parse().map_err(|_| format!("memory size {text:?} is too large"))?;
    let unit = unit.trim();
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("memory size {text:?}: unknown unit {unit:?} (use K, M, G or T: binary units)")),
    };
    value.checked_mul(1u64 << shift).ok_or_else(|| format!("memory size {text:?} is too large"))
}

/// Granules to recall so that `available` bytes rise back to `floor`, at
/// most the `granted` ones.
pub fn pressure_recall_granules(available: u64, floor: u64, granule_size: u64, granted: u64) -> u32 {
    if available >= floor || granule_size == 0 {
        return 0;
    }
    (floor - available).div_ceil(granule_size).min(granted).min(u64::from(u32::MAX)) as u32
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resident memory of a process, in bytes (VmRSS).
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_recalls_what_the_floor_needs_and_no_more_than_granted() {
        let g = 256 << 10;
        assert_eq!(pressure_recall_granules(2 << 30, 1 << 30, g, 100), 0);
        assert_eq!(pressure_recall_granules((1 << 30) - 1, 1 << 30, g, 100), 1);
        assert_eq!(pressure_recall_granules((1 << 30) - 3 * g, 1 << 30, g, 100), 3);
        assert_eq!(pressure_recall_granules(0, 1 << 30, g, 100), 100);
        assert_eq!(pressure_recall_granules(0, 1 << 30, 0, 100), 0);
    }

    #[test]
    fn budgets_parse() {
        assert_eq!(MemoryBudget::parse("auto"), Ok(MemoryBudget::Auto));
        assert_eq!(MemoryBudget::parse("512M"), Ok(MemoryBudget::Bytes(512 << 20)));
        assert_eq!(MemoryBudget::parse("2GiB"), Ok(MemoryBudget::Bytes(2 << 30)));
        assert_eq!(MemoryBudget::parse("4096"), Ok(MemoryBudget::Bytes(4096)));
        assert!(MemoryBudget::parse("lots").unwrap_err().contains("lots"));
        assert!(MemoryBudget::parse("3Q").unwrap_err().contains("unit"));
    }

    #[test]
    fn sizes_are_whole_and_exact() {
        assert_eq!(parse_size("320M"), Ok(320 << 20));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["M", "", "1.5G", "-1M", "auto"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("99999999999999999999").unwrap_err().contains("too large"));
        assert!(parse_size("17179869184G").unwrap_err().contains("too large"));
    }
}
