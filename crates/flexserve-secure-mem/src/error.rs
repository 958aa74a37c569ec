use std::io;

/// Errors of the granule pool.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The configuration is unusable; the message names the field and why.
    #[error("invalid pool configuration: {0}")]
    InvalidConfig(String),

    /// Secret memory was required but memfd_secret(2) does not work here.
    #[error("secret memory (memfd_secret) was required but is unavailable: {0}")]
    SecretMemoryUnavailable(io::Error),

    /// A system call failed; `op` says what the pool was doing.
    #[error("{op} failed: {source}")]
    Os {
        /// What the pool was doing, e.g. "prepare granule".
        op: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// An allocation needs more free granules than the granted quota has.
    #[error(
        "region of {bytes} bytes needs {needed} granules but only {free} are free \
         ({granted} granted, {in_use} in use); the normal world must grant {} more",
        needed - free
    )]
    InsufficientGranules {
        /// Requested region size in bytes.
        bytes: usize,
        /// Granules the region needs.
        needed: usize,
        /// Free, prepared granules in the pool.
        free: usize,
        /// Granules granted (the quota).
        granted: usize,
        /// Granules held by live regions.
        in_use: usize,
    },

    /// A zero-byte region was requested.
    #[error("a region must be at least one byte long")]
    EmptyRegion,

    /// The pool is a static carve-out: its size was fixed at creation and cannot be grown.
    #[error("the pool is a static carve-out of {granules} granules; its size is fixed at creation")]
    FixedCarveOut {
        /// Size of the carve-out in granules.
        granules: usize,
    },

    /// A size computation overflowed (absurdly large request).
    #[error("{what} overflows the address space")]
    TooLarge {
        /// What was being sized.
        what: &'static str,
    },
}
