//! The secure world of FlexServe.
//!
//! A separate process, started by the normal world and connected to it by a
//! socket pair, that alone holds the device key, model keys, plaintext
//! weights, prompts, token ids and the KV cache. It opens no files: the
//! normal world hands it sealed headers and ciphertext chunks through a
//! shared buffer, and it answers with generated text.
//!
//! Layout:
//! - [`platform`]: the small interface the rest is written against (secure
//!   memory, channel, key store, compute), with the Linux implementation; a
//!   TrustZone/OP-TEE backend implements the same traits.
//! - [`harden`]: what the process does to itself before it touches a secret
//!   (not dumpable, no core dumps, descriptors closed).
//! - [`seccomp`]: the seccomp filter, a table per architecture of the allowed
//!   system calls, each with its argument rule and reason.
//! - [`models`]: sealed models resident in Flex-Mem, layer by layer.
//! - [`world`]: the command loop of the world-boundary protocol.

pub mod harden;
pub mod identity;
pub mod models;
pub mod platform;
pub mod policy;
pub mod seccomp;
pub mod service;
pub mod state;
pub mod world;
