//! The secure world's policy: its own configuration file, read once at start
//! from its state directory, never taken from a peer.
//!
//! `policy.conf` holds `key = value` lines (`#` starts a comment). Every key
//! is optional; an unknown key, a repeated key or a bad value stops the
//! secure world from starting, naming the line.
//!
//! | key | values | default | meaning |
//! |---|---|---|---|
//! | `protection` | `memfd_secret`, `any` | `memfd_secret` | `memfd_secret`: refuse to start where the kernel lacks it; `any`: fall back to locked memory |
//! | `vendor_key` | 64 hex digits | none | open only models this vendor signed |
//! | `allow_perplexity` | `true`, `false` | `false` | score texts (per-token probabilities leave as one figure, but a scorer is an extraction oracle); a model whose sealed header carries `flexserve.allow_perplexity = true` may be scored regardless |
//! | `min_scoring_context` | positions | 64 | the smallest context a text may be scored with |
//! | `threads` | count, 0 = one per core | 0 | compute threads |
//! | `granule_size` | bytes, a multiple of 4096 | 262144 | Flex-Mem granule size |
//! | `memory_limit` | bytes, 0 = physical memory | 0 | most secure memory any peers together may grant |

use flexserve_sealed::VendorPublicKey;

/// The policy file's name inside the state directory.
pub const POLICY_FILE: &str = "policy.conf";
/// Default granule size: see `flexserve_normal::DEFAULT_GRANULE_SIZE` for why.
pub const DEFAULT_GRANULE_SIZE: usize = 256 << 10;
/// Default smallest scoring context.
pub const DEFAULT_MIN_SCORING_CONTEXT: u32 = 64;
/// Largest policy file read (it is a few lines).
pub const MAX_POLICY_BYTES: usize = 64 << 10;

/// What memory protection the secure world insists on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequiredProtection {
    /// memfd_secret or refuse to start.
    SecretMemory,
    /// memfd_secret where the kernel has it, else locked anonymous memory.
    Any,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub protection: RequiredProtection,
    pub vendor_key: Option<VendorPublicKey>,
    pub allow_perplexity: bool,
    pub min_scoring_context: u32,
    pub threads: usize,
    pub granule_size: usize,
    /// 0: the machine's physical memory.
    pub memory_limit: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            protection: RequiredProtection::SecretMemory,
            vendor_key: None,
            allow_perplexity: false,
            min_scoring_context: DEFAULT_MIN_SCORING_CONTEXT,
            threads: 0,
            granule_size: DEFAULT_GRANULE_SIZE,
            memory_limit: 0,
        }
    }
}

impl Policy {
    /// Parses a policy file's text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Policy, String> {
        let mut policy = Policy::default();
        let mut seen: Vec<&str> = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = || format!("{source} line {}", n + 1);
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("{}: expected `key = value`, found {line:?}", at()));
            };
            let (key, value) = (key.trim(), value.trim());
            if seen.contains(&key) {
                return Err(format!("{}: {key} is set twice", at()));
            }
            let bad = |expected: &str| format!("{}: {key} = {value:?}: expected {expected}", at());
            let number = |expected: &str| value.parse::<u64>().map_err(|_| bad(expected));
            match key {
                "protection" => {
                    policy.protection = match value {
                        "memfd_secret" => RequiredProtection::SecretMemory,
                        "any" => RequiredProtection::Any,
                        _ => return Err(bad("memfd_secret or any")),
                    }
                }
                "vendor_key" => {
                    policy.vendor_key =
                        Some(VendorPublicKey::from_hex(value).map_err(|e| format!("{}: vendor_key: {e}", at()))?)
                }
                "allow_perplexity" => {
                    policy.allow_perplexity = match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad("true or false")),
                    }
                }
                "min_scoring_context" => {
                    policy.min_scoring_context =
                        u32::try_from(number("a number of positions")?).map_err(|_| bad("a number of positions"))?
                }
                "threads" => policy.threads = number("a thread count")?.min(4096) as usize,
                "granule_size" => {
                    let g = number("a size in bytes")?;
                    if g == 0 || g % 4096 != 0 || g > 1 << 30 {
                        return Err(bad("a positive multiple of 4096 bytes, at most 1 GiB"));
                    }
                    policy.granule_size = g as usize;
                }
                "memory_limit" => policy.memory_limit = number("a size in bytes")?,
                _ => {
                    return Err(format!(
                        "{}: unknown key {key:?} (known: protection, vendor_key, allow_perplexity, \
                         min_scoring_context, threads, granule_size, memory_limit)",
                        at()
                    ))
                }
            }
            seen.push(key);
        }
        Ok(policy)
    }

    /// The policy in force, one `key = value` line each (for status).
    pub fn describe(&self) -> Vec<String> {
        let mut lines = vec![
            format!(
                "protection = {}",
                match self.protection {
                    RequiredProtection::SecretMemory => "memfd_secret",
                    RequiredProtection::Any => "any",
                }
            ),
            format!("vendor_key = {}", self.vendor_key.as_ref().map_or("none".to_string(), |k| k.to_hex())),
            format!("allow_perplexity = {}", self.allow_perplexity),
            format!("min_scoring_context = {}", self.min_scoring_context),
        ];
        lines.push(format!("threads = {}", self.threads));
        lines.push(format!("granule_size = {}", self.granule_size));
        lines.push(format!("memory_limit = {}", self.memory_limit));
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_strict() {
        let p = Policy::parse("", "policy.conf").unwrap();
        assert_eq!(p.protection, RequiredProtection::SecretMemory);
        assert!(!p.allow_perplexity);
        assert!(p.vendor_key.is_none());
        assert_eq!(p.granule_size, DEFAULT_GRANULE_SIZE);
    }

    #[test]
    fn parses_every_key() {
        let text = "# comment\nprotection = any\nallow_perplexity = true # scoring on\nmin_scoring_context = 128\n\
                    threads = 2\ngranule_size = 2097152\nmemory_limit = 1073741824\n";
        let p = Policy::parse(text, "policy.conf").unwrap();
        assert_eq!(p.protection, RequiredProtection::Any);
        assert!(p.allow_perplexity);
        assert_eq!((p.min_scoring_context, p.threads, p.granule_size, p.memory_limit), (128, 2, 2 << 20, 1 << 30));
        assert!(p.describe().contains(&"allow_perplexity = true".to_string()));
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        let e = Policy::parse("protection = any\nallow_perplexity = yes\n", "p.conf").unwrap_err();
        assert!(e.contains("p.conf line 2") && e.contains("allow_perplexity") && e.contains("true or false"), "{e}");
        let e = Policy::parse("colour = blue", "p.conf").unwrap_err();
        assert!(e.contains("unknown key \"colour\""), "{e}");
        let e = Policy::parse("threads = 1\nthreads = 2", "p.conf").unwrap_err();
        assert!(e.contains("line 2") && e.contains("set twice"), "{e}");
        let e = Policy::parse("granule_size = 1000", "p.conf").unwrap_err();
        assert!(e.contains("multiple of 4096"), "{e}");
        let e = Policy::parse("vendor_key = 12", "p.conf").unwrap_err();
        assert!(e.contains("vendor_key"), "{e}");
        let e = Policy::parse("just words", "p.conf").unwrap_err();
        assert!(e.contains("key = value"), "{e}");
    }
}
