//! The platform interface of the secure world, and its Linux implementation.
//!
//! Everything above this module (models, the command loop) is written against
//! four things: secure memory in granules, a channel to the normal world, a
//! key store, and compute. On Linux these are a Flex-Mem granule pool
//! (`memfd_secret`), a Unix socket plus a memfd shared buffer, key files read
//! once before the seccomp filter is installed, and CPU worker threads. A
//! TrustZone/OP-TEE backend provides the same four.

use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use flexserve_protocol::{BufferRange, ProtocolError, Reply, Request, SharedBuffer};
use flexserve_sealed::{DeviceSecretKey, ModelKey, VendorPublicKey};
use flexserve_secure_mem::{GranulePool, Region};

/// Counters of a secure memory pool, in granules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    pub granted: usize,
    pub prepared: usize,
    pub in_use: usize,
}

/// Memory only the secure world can read, handed out in granules that the
/// normal world grants and recalls (Flex-Mem). Clones share one pool.
pub trait SecureMemory: Clone + Send + Sync + 'static {
    type Region: SecureRegion;
    /// How the memory is protected ("memfd_secret", "locked-anonymous", ...).
    fn protection(&self) -> &'static str;
    /// "flexible" or "static-carve-out".
    fn mode(&self) -> &'static str;
    fn granule_size(&self) -> usize;
    /// Raises the quota by `granules` and prepares them; returns how many were prepared.
    fn grant(&self, granules: usize) -> Result<usize, String>;
    /// A contiguous region of at least `bytes`, from free granted granules.
    fn alloc(&self, bytes: usize) -> Result<Self::Region, String>;
    /// Scrubs and returns up to `granules` free granules to the system; returns how many.
    fn release(&self, granules: usize) -> usize;
    fn stats(&self) -> MemoryStats;
}

/// A contiguous range of secure memory; dropping it scrubs it and gives its
/// granules back to the pool's free list.
pub trait SecureRegion: Send + Sync + 'static {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
    fn granules(&self) -> usize;
}

/// The control channel and the shared bulk buffer to the normal world.
pub trait Channel: Send {
    fn recv(&mut self) -> Result<Request, ProtocolError>;
    /// A request if one has arrived, without waiting for one.
    fn poll_request(&mut self) -> Option<Result<Request, ProtocolError>>;
    fn send(&mut self, reply: &Reply) -> io::Result<()>;
    /// Copies bytes out of the shared buffer (the normal world may change
    /// them at any time, so they are copied before being checked or used).
    fn copy_out(&self, range: BufferRange, dst: &mut [u8]) -> Result<(), String>;
    fn shared_len(&self) -> u64;
}

/// Compute leased to the secure world (CPU worker threads today).
pub trait Compute {
    fn threads(&self) -> usize;
}

/// Keys the secure world holds: loaded once at start, never leaving it.
#[derive(Default)]
pub struct KeyStore {
    pub device: Option<DeviceSecretKey>,
    pub model_keys: Vec<ModelKey>,
    /// When set, only models signed by this vendor are opened.
    pub vendor: Option<VendorPublicKey>,
}

impl KeyStore {
    /// Reads key files (before the seccomp filter forbids opening files).
    pub fn load(
        device: Option<&Path>,
        model_keys: &[impl AsRef<Path>],
        vendor_hex: Option<&str>,
    ) -> Result<KeyStore, String> {
        let device = match device {
            Some(p) if p.exists() => {
                Some(DeviceSecretKey::load(p).map_err(|e| format!("device key {}: {e}", p.display()))?)
            }
            _ => None,
        };
        let model_keys = model_keys
            .iter()
            .map(|p| ModelKey::load(p.as_ref()).map_err(|e| format!("model key {}: {e}", p.as_ref().display())))
            .collect::<Result<Vec<_>, _>>()?;
        let vendor = vendor_hex
            .map(|h| VendorPublicKey::from_hex(h).map_err(|e| format!("vendor public key: {e}")))
            .transpose()?;
        Ok(KeyStore { device, model_keys, vendor })
    }
}

// ---------------------------------------------------------------- Linux

impl SecureMemory for GranulePool {
    type Region = Region;

    fn protection(&self) -> &'static str {
        self.protection().name()
    }
    fn mode(&self) -> &'static str {
        self.mode().name()
    }
    fn granule_size(&self) -> usize {
        GranulePool::granule_size(self)
    }
    fn grant(&self, granules: usize) -> Result<usize, String> {
        GranulePool::grant(self, granules).map(|r| r.granules).map_err(|e| e.to_string())
    }
    fn alloc(&self, bytes: usize) -> Result<Region, String> {
        GranulePool::alloc(self, bytes).map_err(|e| e.to_string())
    }
    fn release(&self, granules: usize) -> usize {
        GranulePool::release(self, granules).granules
    }
    fn stats(&self) -> MemoryStats {
        let s = GranulePool::stats(self);
        MemoryStats { granted: s.granted, prepared: s.prepared, in_use: s.in_use }
    }
}

impl SecureRegion for Region {
    fn bytes(&self) -> &[u8] {
        self.as_slice()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
    fn granules(&self) -> usize {
        Region::granules(self)
    }
}

/// The Linux channel: a Unix stream socket and a memfd shared buffer.
///
/// Frames are assembled in `inbox` from whatever bytes have arrived, so that
/// a look for a request during a generation never waits: a peer that sends
/// half a frame holds up nothing but itself.
pub struct SocketChannel {
    socket: UnixStream,
    writer: BufWriter<UnixStream>,
    shared: SharedBuffer,
    /// Bytes of the frame being received (never more than one frame).
    inbox: Vec<u8>,
}

/// Bytes of a frame's length prefix.
const FRAME_HEADER_LEN: usize = 4;

impl SocketChannel {
    pub fn new(socket: UnixStream, shared: SharedBuffer) -> io::Result<SocketChannel> {
        let writer = BufWriter::new(socket.try_clone()?);
        Ok(SocketChannel { socket, writer, shared, inbox: Vec::new() })
    }

    /// Bytes the frame in the inbox still lacks (its header first), or an
    /// error if its length is over the limit.
    fn missing(&self) -> Result<usize, ProtocolError> {
        if self.inbox.len() < FRAME_HEADER_LEN {
            return Ok(FRAME_HEADER_LEN - self.inbox.len());
        }
        let len = u32::from_le_bytes(self.inbox[..FRAME_HEADER_LEN].try_into().expect("4 bytes")) as usize;
        if len > flexserve_protocol::MAX_FRAME_LEN {
            return Err(ProtocolError::TooLarge { len, max: flexserve_protocol::MAX_FRAME_LEN });
        }
        Ok(FRAME_HEADER_LEN + len - self.inbox.len())
    }

    /// Reads up to what the current frame lacks; `Ok(None)` when nothing is
    /// there and `wait` is false.
    fn fill(&mut self, wait: bool) -> Result<Option<usize>, ProtocolError> {
        let want = self.missing()?.min(64 << 10);
        let have = self.inbox.len();
        self.inbox.resize(have + want, 0);
        let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
        let n = loop {
            // SAFETY: recv writes at most `want` bytes into the inbox's tail, which we just sized for them.
            let n = unsafe { libc::recv(self.socket.as_raw_fd(), self.inbox[have..].as_mut_ptr().cast(), want, flags) };
            if n >= 0 {
                break Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                break Err(e);
            }
        };
        self.inbox.truncate(have + *n.as_ref().unwrap_or(&0));
        match n {
            Ok(0) if have == 0 => Err(ProtocolError::Closed),
            Ok(0) => Err(ProtocolError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("stream ended inside a frame after {have} bytes"),
            ))),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(ProtocolError::Io(e)),
        }
    }

    /// The next complete request, reading as much as needed (`wait`) or
    /// only what has already arrived.
    fn next_request(&mut self, wait: bool) -> Option<Result<Request, ProtocolError>> {
        loop {
            match self.missing() {
                Err(e) => return Some(Err(e)),
                Ok(0) => {
                    let frame = std::mem::take(&mut self.inbox);
                    return Some(flexserve_protocol::decode_request(&frame[FRAME_HEADER_LEN..]));
                }
                Ok(_) => match self.fill(wait) {
                    Ok(Some(_)) => {}
                    Ok(None) => return None,
                    Err(e) => return Some(Err(e)),
                },
            }
        }
    }
}

impl Channel for SocketChannel {
    fn recv(&mut self) -> Result<Request, ProtocolError> {
        self.next_request(true).unwrap_or(Err(ProtocolError::Closed))
    }
    fn poll_request(&mut self) -> Option<Result<Request, ProtocolError>> {
        self.next_request(false)
    }

    fn send(&mut self, reply: &Reply) -> io::Result<()> {
        flexserve_protocol::write_reply(&mut self.writer, reply).map_err(|e| match e {
            ProtocolError::Io(io) => io,
            other => io::Error::other(other.to_string()),
        })?;
        self.writer.flush()
    }
    fn copy_out(&self, range: BufferRange, dst: &mut [u8]) -> Result<(), String> {
        if range.len != dst.len() as u64 {
            return Err(format!("shared range of {} bytes where {} are needed", range.len, dst.len()));
        }
        self.shared.copy_out(range.offset, dst).map_err(|e| e.to_string())
    }
    fn shared_len(&self) -> u64 {
        self.shared.len() as u64
    }
}

/// CPU worker threads.
pub struct CpuCompute {
    pub threads: usize,
}

impl Compute for CpuCompute {
    fn threads(&self) -> usize {
        self.threads
    }
}
