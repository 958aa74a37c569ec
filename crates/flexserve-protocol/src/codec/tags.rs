//! Which variant is which: the wire tags of messages and of the enums
//! inside them (the tables in the `codec` module doc), and variant names.

use crate::{Deployment, ErrorCode, Reply, Request, StopReason};

pub(super) const REQ_HELLO: u8 = 0x01;
pub(super) const REQ_OPEN_MODEL: u8 = 0x02;
pub(super) const REQ_GRANT: u8 = 0x03;
pub(super) const REQ_LOAD_CHUNKS: u8 = 0x04;
pub(super) const REQ_MISSING_CHUNKS: u8 = 0x05;
pub(super) const REQ_GENERATE: u8 = 0x06;
pub(super) const REQ_END_CONVERSATION: u8 = 0x07;
pub(super) const REQ_UNLOAD: u8 = 0x08;
pub(super) const REQ_RECALL: u8 = 0x09;
pub(super) const REQ_STATUS: u8 = 0x0a;
pub(super) const REQ_SHUTDOWN: u8 = 0x0b;
pub(super) const REQ_PERPLEXITY: u8 = 0x0c;
pub(super) const REQ_DEVICE_PUBLIC_KEY: u8 = 0x0d;
pub(super) const REQ_IMPORT_KEY: u8 = 0x0e;
pub(super) const REQ_ADD_STORED_KEY: u8 = 0x0f;
pub(super) const REQ_CANCEL: u8 = 0x10;
pub(super) const REQ_IDENTITY: u8 = 0x11;
pub(super) const REQ_OPEN_ENCRYPTED: u8 = 0x12;
pub(super) const REQ_GENERATE_ENCRYPTED: u8 = 0x13;
pub(super) const REQ_CLOSE_ENCRYPTED: u8 = 0x14;
pub(super) const REQ_EVICT: u8 = 0x15;
pub(super) const REQ_PAUSE: u8 = 0x16;
pub(super) const REQ_RESUME: u8 = 0x17;
pub(super) const REQ_START_STREAM: u8 = 0x18;
pub(super) const REQ_STEP_STREAMS: u8 = 0x19;
pub(super) const REQ_END_STREAM: u8 = 0x1a;

pub(super) const REP_HELLO: u8 = 0x81;
pub(super) const REP_MODEL_OPENED: u8 = 0x82;
pub(super) const REP_GRANTED: u8 = 0x83;
pub(super) const REP_CHUNKS_LOADED: u8 = 0x84;
pub(super) const REP_MISSING: u8 = 0x85;
pub(super) const REP_TOKEN: u8 = 0x86;
pub(super) const REP_GENERATED: u8 = 0x87;
pub(super) const REP_RECALLED: u8 = 0x88;
pub(super) const REP_STATUS: u8 = 0x89;
pub(super) const REP_OK: u8 = 0x8a;
pub(super) const REP_ERROR: u8 = 0x8b;
pub(super) const REP_PERPLEXITY: u8 = 0x8c;
pub(super) const REP_MEMORY_NEEDED: u8 = 0x8d;
pub(super) const REP_DEVICE_PUBLIC_KEY: u8 = 0x8e;
pub(super) const REP_KEY_IMPORTED: u8 = 0x8f;
pub(super) const REP_IDENTITY: u8 = 0x90;
pub(super) const REP_ENCRYPTED_OPENED: u8 = 0x91;
pub(super) const REP_SEALED: u8 = 0x92;
pub(super) const REP_LOAD_NEEDED: u8 = 0x93;
pub(super) const REP_EVICTED: u8 = 0x94;
pub(super) const REP_PAUSED: u8 = 0x95;
pub(super) const REP_STEPPED: u8 = 0x96;

pub(super) const INPUT_RAW: u8 = 0;
pub(super) const INPUT_CHAT_TURN: u8 = 1;
pub(super) const INPUT_MESSAGES: u8 = 2;

pub(super) const STOP_REASONS: [StopReason; 4] =
    [StopReason::EndOfGeneration, StopReason::MaxTokens, StopReason::StopString, StopReason::ContextFull];

pub(super) const DEPLOYMENTS: [Deployment; 2] = [Deployment::Service, Deployment::Development];

pub(super) fn deployment_tag(d: Deployment) -> u8 {
    match d {
        Deployment::Service => 0,
        Deployment::Development => 1,
    }
}

pub(super) const ERROR_CODES: [ErrorCode; 13] = [
    ErrorCode::Malformed,
    ErrorCode::OutOfOrder,
    ErrorCode::Version,
    ErrorCode::NoSuchModel,
    ErrorCode::Verification,
    ErrorCode::NoMemory,
    ErrorCode::NotResident,
    ErrorCode::BadArgument,
    ErrorCode::Engine,
    ErrorCode::Internal,
    ErrorCode::Policy,
    ErrorCode::Cancelled,
    ErrorCode::EncryptedSession,
];

impl StopReason {
    /// Its number on the wire (the table in the `codec` module), which
    /// encrypted sessions' `done` records also carry.
    pub fn code(self) -> u8 {
        stop_reason_tag(self)
    }

    /// The stop reason numbered `code`, if any.
    pub fn from_code(code: u8) -> Option<StopReason> {
        STOP_REASONS.get(usize::from(code)).copied()
    }
}

pub(super) fn stop_reason_tag(stop: StopReason) -> u8 {
    match stop {
        StopReason::EndOfGeneration => 0,
        StopReason::MaxTokens => 1,
        StopReason::StopString => 2,
        StopReason::ContextFull => 3,
    }
}

pub(super) fn error_code_tag(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::Malformed => 0,
        ErrorCode::OutOfOrder => 1,
        ErrorCode::Version => 2,
        ErrorCode::NoSuchModel => 3,
        ErrorCode::Verification => 4,
        ErrorCode::NoMemory => 5,
        ErrorCode::NotResident => 6,
        ErrorCode::BadArgument => 7,
        ErrorCode::Engine => 8,
        ErrorCode::Internal => 9,
        ErrorCode::Policy => 10,
        ErrorCode::Cancelled => 11,
        ErrorCode::EncryptedSession => 12,
    }
}

impl ErrorCode {
    /// The code's number on the wire (the `codec` module doc), which encrypted
    /// sessions' error records also carry.
    pub fn number(self) -> u8 {
        error_code_tag(self)
    }
}

impl Request {
    /// The variant's name, for logs and error messages ("Request::Generate").
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "Request::Hello",
            Request::OpenModel { .. } => "Request::OpenModel",
            Request::Grant { .. } => "Request::Grant",
            Request::LoadChunks { .. } => "Request::LoadChunks",
            Request::MissingChunks { .. } => "Request::MissingChunks",
            Request::Generate(_) => "Request::Generate",
            Request::EndConversation { .. } => "Request::EndConversation",
            Request::Unload { .. } => "Request::Unload",
            Request::Recall { .. } => "Request::Recall",
            Request::Evict { .. } => "Request::Evict",
            Request::Pause => "Request::Pause",
            Request::Resume => "Request::Resume",
            Request::Status => "Request::Status",
            Request::Shutdown => "Request::Shutdown",
            Request::Perplexity { .. } => "Request::Perplexity",
            Request::DevicePublicKey => "Request::DevicePublicKey",
            Request::ImportKey { .. } => "Request::ImportKey",
            Request::AddStoredKey { .. } => "Request::AddStoredKey",
            Request::Cancel => "Request::Cancel",
            Request::Identity => "Request::Identity",
            Request::OpenEncrypted { .. } => "Request::OpenEncrypted",
            Request::GenerateEncrypted { .. } => "Request::GenerateEncrypted",
            Request::CloseEncrypted { .. } => "Request::CloseEncrypted",
            Request::StartStream { .. } => "Request::StartStream",
            Request::StepStreams { .. } => "Request::StepStreams",
            Request::EndStream { .. } => "Request::EndStream",
        }
    }
}

impl Reply {
    /// The variant's name, for logs and error messages ("Reply::Token").
    pub fn name(&self) -> &'static str {
        match self {
            Reply::Hello { .. } => "Reply::Hello",
            Reply::ModelOpened { .. } => "Reply::ModelOpened",
            Reply::Granted { .. } => "Reply::Granted",
            Reply::ChunksLoaded { .. } => "Reply::ChunksLoaded",
            Reply::Missing { .. } => "Reply::Missing",
            Reply::LoadNeeded { .. } => "Reply::LoadNeeded",
            Reply::Token { .. } => "Reply::Token",
            Reply::Generated(_) => "Reply::Generated",
            Reply::Recalled { .. } => "Reply::Recalled",
            Reply::Evicted { .. } => "Reply::Evicted",
            Reply::Paused { .. } => "Reply::Paused",
            Reply::Status(_) => "Reply::Status",
            Reply::Ok => "Reply::Ok",
            Reply::Error { .. } => "Reply::Error",
            Reply::Perplexity { .. } => "Reply::Perplexity",
            Reply::MemoryNeeded { .. } => "Reply::MemoryNeeded",
            Reply::DevicePublicKey { .. } => "Reply::DevicePublicKey",
            Reply::KeyImported { .. } => "Reply::KeyImported",
            Reply::Identity { .. } => "Reply::Identity",
            Reply::EncryptedOpened { .. } => "Reply::EncryptedOpened",
            Reply::Sealed { .. } => "Reply::Sealed",
            Reply::Stepped { .. } => "Reply::Stepped",
        }
    }
}
