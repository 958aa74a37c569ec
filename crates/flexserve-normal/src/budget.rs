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
    /// Parses `auto`, a number of bytes, or a number with K, M, G (binary units).
    pub fn parse(text: &str) -> std::result::Result<MemoryBudget, String> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(MemoryBudget::Auto);
        }
        let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit() && *c != '.') {
            Some((i, _)) => t.split_at(i),
            None => (t, ""),
        };
        let value: f64 = digits.parse().map_err(|_| format!("memory size {text:?}: expected e.g. 512M, 2G or auto"))?;
        let scale = match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
            "" => 1u64,
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            "T" => 1 << 40,
            _ => return Err(format!("memory size {text:?}: unknown unit {unit:?} (use K, M, G)")),
        };
        Ok(MemoryBudget::Bytes((value * scale as f64) as u64))
    }

    pub(crate) fn bytes(self) -> u64 {
        match self {
            MemoryBudget::Bytes(b) => b,
            MemoryBudget::Auto => available_memory().map_or(4 << 30, |a| a / 4 * 3),
        }
    }
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
}
