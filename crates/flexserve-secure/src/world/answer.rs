//! Where a generation's answer goes and how its end is told on the wire:
//! shared by the generation itself and the batch that decodes streams, so
//! that neither imports the other for them.

use super::*;

/// Where a generation's answer goes.
pub(super) enum Answer<'a> {
    /// To the normal world as `Token` replies, to the end.
    Tokens,
    /// As records sealed to an encrypted session's client, to the end.
    Sealed(&'a mut flexserve_e2e::ServerSession),
    /// Nowhere yet: the prompt is evaluated and the generation waits in its
    /// model's batch as this stream (`StepStreams` decodes it).
    Stream(u32),
}

/// The engine's stop reason on the wire.
pub(super) fn stop_reason(stop: flexserve_engine::StopReason) -> StopReason {
    match stop {
        flexserve_engine::StopReason::EndOfGeneration => StopReason::EndOfGeneration,
        flexserve_engine::StopReason::MaxTokens => StopReason::MaxTokens,
        flexserve_engine::StopReason::StopString => StopReason::StopString,
        flexserve_engine::StopReason::ContextFull => StopReason::ContextFull,
    }
}
