//! The normal world's side of the world boundary.
//!
//! [`SecureWorld`] connects to the secure world, which runs as its own
//! principal ([`SecureWorld::connect`], a Unix socket that its launcher
//! bound; see `docs/secure-world.md`), or, in development mode, starts it as
//! this user's child ([`SecureWorld::spawn`], unprotected). It hands over a
//! shared buffer, and drives the secure world: it reads
//! sealed headers and ciphertext chunks from storage into the shared buffer
//! (the normal world does the I/O, never the decryption), grants secure
//! memory within its budget ([`MemoryBudget`], the management right of
//! Flex-Mem), recalls it, and relays generation requests. It never holds a
//! key, a plaintext weight or a token id.

//!
//! Layout, by job: [`launch`] (reaching the secure world), [`link`] (the
//! session and its messages), [`feeder`] (ciphertext from storage),
//! [`relay`] (generation and scoring), [`prefetch`] (loading the model a
//! later request uses, beside other work), [`governor`] (pressure watch
//! and `flexserve recall`), [`budget`] (the memory budget), [`control`]
//! (the recall socket).

use std::path::PathBuf;

use flexserve_protocol::{ErrorCode, ProtocolError, Reply};

pub mod budget;
pub mod control;
pub mod feeder;
pub mod governor;
pub mod launch;
pub mod link;
pub mod prefetch;
pub mod relay;
mod streams;

pub use budget::{available_memory, parse_size, pressure_recall_granules, resident_bytes, MemoryBudget};
pub use feeder::{weight_granules, BatchSpan, LoadReport, OpenedModel};
pub use governor::Recall;
pub use launch::{
    connect_service, default_dev_state_dir, flexserve_home, peer_pid, secure_binary, send_descriptor, service_socket,
    spawn_process, PoolChoice, RawSecureWorld, RawSession, SecureWorldOptions, DEFAULT_SERVICE_SOCKET,
};
pub use link::{CoreLease, Granter, SecureWorld, WorldInfo};
pub use prefetch::PrefetchReport;

/// Name of the secure world's executable.
pub const SECURE_BINARY: &str = "flexserve-secure";

/// Granule size the secure world is started with unless told otherwise. Each
/// layer is one region of whole granules, and a small model's layers are a few
/// MiB: 2 MiB granules would waste up to a third of the memory there, 256 KiB
/// granules about 5%, while the per-granule cost (a few system calls) stays
/// small next to protecting the pages themselves.
pub const DEFAULT_GRANULE_SIZE: usize = 256 << 10;

/// Shared buffer size: two halves that each hold the largest chunk (64 MiB
/// plus its tag). Pages are only allocated where written.
pub const DEFAULT_SHARED_LEN: usize = 130 << 20;

/// Ciphertext sent per LoadChunks: small enough that reading the next batch
/// overlaps decrypting this one, large enough to keep round trips rare.
pub const LOAD_BATCH_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NormalError {
    #[error("secure world executable not found: {0} (build the workspace with `cargo build --release`, or set FLEXSERVE_SECURE_BIN)")]
    BinaryNotFound(PathBuf),
    #[error("starting the secure world {path}: {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("the secure world terminated ({0}); the request was lost, a new request starts a new secure world")]
    Died(String),
    #[error("the secure world service closed this session ({0}); the request was lost")]
    SessionClosed(String),
    #[error("no secure world service at {path}: {source} (start it as root with flexserve-launcher, see docs/secure-world.md; or run with --dev for an unprotected development secure world)")]
    NoService { path: PathBuf, source: std::io::Error },
    #[error("the secure world at {path} does not admit this user: its socket is for the members of its group (ask its administrator to add you)")]
    NotAdmitted { path: PathBuf },
    #[error("secure world: {message} [{code:?}]")]
    Secure { code: ErrorCode, message: String },
    #[error("the secure world answered {got} where {expected} was expected")]
    Unexpected { expected: &'static str, got: String },
    #[error("secure memory limit: {0}")]
    Budget(String),
    #[error("{path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error("world boundary: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub(crate) type Result<T> = std::result::Result<T, NormalError>;

pub(crate) fn unexpected(expected: &'static str, got: &Reply) -> NormalError {
    let got: String = format!("{got:?}").chars().take(200).collect();
    NormalError::Unexpected { expected, got }
}
