//! The cost of crossing the world boundary, measured on a live secure world.
//!
//! - a Status request/reply round trip (socket, framing, decode, encode);
//! - a LoadChunks of one sealed 1 MiB chunk already in the shared buffer
//!   (the secure world copies it into secure memory, decrypts and verifies
//!   it there), against decrypting the same chunk in this process with
//!   `SealedModel::open_chunk`, so that the boundary's share is visible.
//!
//! ```text
//! cargo build --release -p flexserve-secure --bin flexserve-secure
//! cargo run --release -p flexserve-secure --example round_trip [SEALABLE.gguf] [STATUS_ITERATIONS]
//! ```
//!
//! The model (default: the SmolLM2 GGUF in .cache/models) is sealed with a
//! fresh key into a temporary directory first.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flexserve_normal::{spawn_process, MemoryBudget, SecureWorldOptions};
use flexserve_protocol::{
    read_reply, write_request, BufferRange, ChunkRef, ErrorCode, Reply, Request, SharedBuffer, PROTOCOL_VERSION,
};
use flexserve_sealed::{seal_file, ModelKey, SealOptions, SealedHeader, SealedModel, DEFAULT_CHUNK_SIZE};

type Error = Box<dyn std::error::Error>;

const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
const WARM_UP: usize = 2_000;
/// Times each model is opened afresh (each open gives one load of every chunk).
const LOAD_ROUNDS: usize = 4;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(args.next().unwrap_or_else(|| DEFAULT_MODEL.to_string()));
    let iterations: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20_000);

    let dir = tempfile::tempdir()?;
    let key = ModelKey::generate();
    let key_path = dir.path().join("model.key");
    key.save(&key_path)?;
    let sealed_path = dir.path().join("model.fsm");
    seal_file(&model, &sealed_path, &key, &SealOptions::default(), &mut |_, _| {})?;
    let file = std::fs::read(&sealed_path)?;
    let prefix = SealedHeader::read_prefix(&file[..])?;
    let header = SealedHeader::read(&prefix)?;

    let mut world = World::start(&key_path)?;
    world.call(&Request::Hello { version: PROTOCOL_VERSION })?;

    // Status round trips.
    for _ in 0..WARM_UP {
        world.call(&Request::Status)?;
    }
    let mut status = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        world.call(&Request::Status)?;
        status.push(t.elapsed());
    }

    // LoadChunks of single full-size chunks. A chunk loads only once per open
    // model, so the model is opened afresh for each round. The first chunk of
    // each layer also allocates that layer's region: those loads are done
    // first and not timed, so the timed ones are copy + decrypt + verify only.
    let full = DEFAULT_CHUNK_SIZE + flexserve_sealed::CHUNK_TAG_LEN;
    let groups: Vec<String> =
        header.chunks.iter().map(|c| group_of(&header.gguf.tensors[c.tensor_index as usize].name)).collect();
    let mut loads = Vec::new();
    let mut chunk_bytes = 0;
    for round in 0..LOAD_ROUNDS {
        world.shared.copy_in(0, &prefix)?;
        let range = BufferRange { offset: 0, len: prefix.len() as u64 };
        let (id, granules) = match world.call(&Request::OpenModel { name: format!("round {round}"), header: range })? {
            Reply::ModelOpened { model, granules_needed, .. } => (model, granules_needed),
            other => return Err(format!("OpenModel: {other:?}").into()),
        };
        if round == 0 {
            world.call(&Request::Grant { granules: granules + 8 })?;
        }
        let at = prefix.len().next_multiple_of(4096) as u64;
        let mut seen = std::collections::HashSet::new();
        let mut timed = Vec::new();
        for (index, c) in header.chunks.iter().enumerate() {
            let first_of_group = seen.insert(groups[index].clone());
            if first_of_group {
                world.load(id, index, &file[c.file_range().start as usize..c.file_range().end as usize], at)?;
            } else if c.sealed_len() == full {
                timed.push(index);
            }
        }
        for index in timed {
            let c = header.chunks[index];
            chunk_bytes = c.len as usize;
            loads.push(world.load(id, index, &file[c.file_range().start as usize..c.file_range().end as usize], at)?);
        }
        // Unload scrubs the model's regions back into the free pool for the next round.
        world.call(&Request::Unload { model: id })?;
    }

    // The same chunks decrypted in this process.
    let opened = SealedModel::open(&prefix, &key)?;
    let mut out = vec![0u8; DEFAULT_CHUNK_SIZE];
    let full_chunks: Vec<usize> = (0..header.chunks.len()).filter(|&i| header.chunks[i].sealed_len() == full).collect();
    let mut in_process = Vec::new();
    for round in 0..LOAD_ROUNDS + 1 {
        for &index in &full_chunks {
            let c = header.chunks[index];
            let sealed = &file[c.file_range().start as usize..c.file_range().end as usize];
            let t = Instant::now();
            opened.open_chunk(index, sealed, &mut out)?;
            let elapsed = t.elapsed();
            // The first round warms the caches and is not counted.
            if round > 0 {
                in_process.push(elapsed);
            }
        }
    }
    world.call(&Request::Shutdown)?;
    let exit = world.child.wait()?;

    println!("world boundary round trips ({}; the machine is shared, figures are indicative)", std::env::consts::ARCH);
    println!("{:<52} {:>8} {:>12} {:>12}", "operation", "samples", "median", "p99");
    row("Status request/reply", &mut status);
    let mib = chunk_bytes as f64 / (1 << 20) as f64;
    let load_label = format!("LoadChunks, one {mib:.0} MiB chunk (copy+decrypt+verify)");
    let load_median = row(&load_label, &mut loads);
    let local_median = row(&format!("in-process open_chunk, same {mib:.0} MiB chunks"), &mut in_process);
    let overhead = load_median.saturating_sub(local_median);
    println!(
        "boundary overhead per 1 MiB chunk: {:.1} us median ({:.0}% over decrypting in-process); \
         secure-world throughput {:.2} GiB/s, in-process {:.2} GiB/s",
        overhead.as_secs_f64() * 1e6,
        100.0 * overhead.as_secs_f64() / local_median.as_secs_f64(),
        chunk_bytes as f64 / load_median.as_secs_f64() / (1u64 << 30) as f64,
        chunk_bytes as f64 / local_median.as_secs_f64() / (1u64 << 30) as f64,
    );
    println!("secure world exit: {exit}");
    Ok(())
}

/// A transformer layer (`blk.N`) or the rest: the secure world's region groups.
fn group_of(tensor: &str) -> String {
    match tensor.strip_prefix("blk.").and_then(|r| r.split('.').next()) {
        Some(n) => format!("blk.{n}"),
        None => "rest".to_string(),
    }
}

/// Prints one row; returns the median.
fn row(label: &str, samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let (median, p99) = (pick(0.5), pick(0.99));
    println!("{label:<52} {:>8} {:>9.1} us {:>9.1} us", samples.len(), micros(median), micros(p99));
    median
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct World {
    child: std::process::Child,
    socket: UnixStream,
    shared: SharedBuffer,
}

impl World {
    fn start(key: &Path) -> Result<World, Error> {
        let opts = SecureWorldOptions {
            binary: Some(secure_binary()?),
            model_keys: vec![key.to_path_buf()],
            budget: MemoryBudget::Bytes(1 << 30),
            shared_len: 16 << 20,
            ..SecureWorldOptions::default()
        };
        let raw = spawn_process(&opts)?;
        Ok(World { child: raw.child, socket: raw.socket, shared: raw.shared })
    }

    /// One request, one reply (no Generate here, so no Token replies); an error reply is an error.
    fn call(&mut self, request: &Request) -> Result<Reply, Error> {
        write_request(&mut self.socket, request)?;
        self.socket.flush()?;
        match read_reply(&mut self.socket)? {
            Reply::Error { code, message } => Err(format!("{code:?}: {message}").into()),
            reply => Ok(reply),
        }
    }

    /// Places one sealed chunk in the shared buffer at `at` (not timed), then
    /// times its LoadChunks round trip.
    fn load(&mut self, model: u32, index: usize, sealed: &[u8], at: u64) -> Result<Duration, Error> {
        self.shared.copy_in(at, sealed)?;
        let chunk = ChunkRef { index: index as u32, at: BufferRange { offset: at, len: sealed.len() as u64 } };
        let request = Request::LoadChunks { model, chunks: vec![chunk] };
        let t = Instant::now();
        let reply = self.call(&request);
        let elapsed = t.elapsed();
        match reply {
            Ok(Reply::ChunksLoaded { loaded: 1 }) => Ok(elapsed),
            Err(e) if e.to_string().starts_with(&format!("{:?}", ErrorCode::NoMemory)) => {
                Err(format!("chunk {index}: {e} (grant more)").into())
            }
            other => Err(format!("LoadChunks {index}: {other:?}").into()),
        }
    }
}

/// `flexserve-secure` beside this example's directory (target/<profile>/), or $FLEXSERVE_SECURE_BIN.
fn secure_binary() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os("FLEXSERVE_SECURE_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).ok_or("no directory above the example")?;
    let candidate = profile_dir.join("flexserve-secure");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(format!(
            "{} not found: build it first with `cargo build --release -p flexserve-secure --bin flexserve-secure`",
            candidate.display()
        )
        .into())
    }
}
