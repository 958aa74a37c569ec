//! How much opening a sealed model costs next to the bare cipher and to
//! reading the plain file, and how long sealing takes.
//!
//! ```text
//! cargo run --release -p flexserve-sealed --example open_throughput -- MODEL.gguf \
//!     [--threads 1,2] [--runs 5] [--seal-runs 3] [--synthetic-mib 1024]
//! ```
//!
//! For MODEL.gguf and for a synthetic GGUF of about `--synthetic-mib` MiB of
//! random Q8_0-sized tensors (0 skips it), written to a temporary directory
//! that is deleted afterwards, it prints:
//! - the time `seal_file` takes (median of `--seal-runs`, fsync included);
//! - per round, alternating so that drift hits every figure alike, and
//!   reported as the median over `--runs` rounds (at least 5):
//!   (a) ring's AES-256-GCM open of valid 1 MiB buffers, in place, per thread
//!   count (aggregate over threads; each open timed on its own, the
//!   re-encryption that restores the buffer is not timed);
//!   (b) reading the plain GGUF's data section from the page cache with
//!   `read` into a 1 MiB buffer;
//!   (c) reading every chunk of the sealed file (`pread`) and opening it with
//!   `SealedModel::open_chunk` into a caller buffer, chunks split into
//!   contiguous runs across `std::thread::scope` threads; and the same with
//!   `open_chunk_in_place`, which decrypts in the read buffer (no copy);
//! - the ratios open / raw AEAD and open / plain read.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flexserve_gguf::{GgmlType, GgufHeader, GgufWriter, Value};
use flexserve_sealed::{seal_file, ModelKey, SealOptions, SealedHeader, SealedModel, CHUNK_TAG_LEN};
use ring::aead;

const MIB: usize = 1 << 20;
/// Bytes each thread opens per raw AEAD measurement.
const RAW_BYTES_PER_THREAD: usize = 128 * MIB;

struct Args {
    model: PathBuf,
    threads: Vec<usize>,
    runs: usize,
    seal_runs: usize,
    synthetic_mib: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut model, mut threads, mut runs, mut seal_runs, mut synthetic_mib) = (None, vec![1, 2], 5, 3, 1024);
    let number = |flag: &str, v: Option<String>| -> Result<usize, String> {
        v.ok_or(format!("{flag} needs a value"))?.parse().map_err(|e| format!("{flag}: {e}"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--threads" => {
                let list = args.next().ok_or("--threads needs a list such as 1,2")?;
                threads = list
                    .split(',')
                    .map(|t| t.trim().parse::<usize>().map_err(|e| format!("--threads {list:?}: {e}")))
                    .collect::<Result<_, _>>()?;
                if threads.contains(&0) || threads.is_empty() {
                    return Err("--threads: counts must be at least 1".into());
                }
            }
            "--runs" => runs = number("--runs", args.next())?.max(5),
            "--seal-runs" => seal_runs = number("--seal-runs", args.next())?.max(1),
            "--synthetic-mib" => synthetic_mib = number("--synthetic-mib", args.next())?,
            flag if flag.starts_with("--") => return Err(format!("unknown flag {flag}")),
            path if model.is_none() => model = Some(PathBuf::from(path)),
            extra => return Err(format!("unexpected argument {extra}")),
        }
    }
    let model = model
        .ok_or("usage: open_throughput MODEL.gguf [--threads 1,2] [--runs N] [--seal-runs N] [--synthetic-mib N]")?;
    Ok(Args { model, threads, runs, seal_runs, synthetic_mib })
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    let dir = tempfile::tempdir().expect("cannot create a temporary directory");
    println!(
        "threads {:?}, {} alternating rounds (medians), {} seal runs; temporary files in {}",
        args.threads,
        args.runs,
        args.seal_runs,
        dir.path().display()
    );
    measure_model(&args, &args.model, dir.path());
    if args.synthetic_mib > 0 {
        let path = dir.path().join("synthetic.gguf");
        let t = Instant::now();
        let bytes = write_synthetic(&path, args.synthetic_mib);
        println!(
            "\nwrote synthetic GGUF {} ({:.2} GB of Q8_0-sized random tensors) in {:.1} s",
            path.display(),
            bytes as f64 / 1e9,
            t.elapsed().as_secs_f64()
        );
        measure_model(&args, &path, dir.path());
        std::fs::remove_file(&path).expect("cannot delete the synthetic GGUF");
    }
}

/// A GGUF of about `mib` MiB: 64 MiB Q8_0 tensors of random bytes (the
/// last one smaller), built and written one at a time.
fn write_synthetic(path: &Path, mib: usize) -> u64 {
    const Q8_0_BLOCK_BYTES: usize = 34;
    const ROW: u64 = 4096;
    let row_bytes = ROW as usize / 32 * Q8_0_BLOCK_BYTES;
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("general.name", Value::String("synthetic sealing benchmark".into()));
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut remaining = mib * MIB;
    let mut total = 0u64;
    for index in 0.. {
        let rows = remaining.min(64 * MIB) / row_bytes;
        if rows == 0 {
            break;
        }
        let mut data = vec![0u8; rows * row_bytes];
        for word in data.chunks_exact_mut(8) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            word.copy_from_slice(&rng.to_le_bytes());
        }
        total += data.len() as u64;
        remaining -= data.len();
        w.add_tensor(format!("blk.{index}.ffn_up.weight"), GgmlType::Q8_0, &[ROW, rows as u64], data)
            .expect("valid synthetic tensor");
    }
    w.write_file(path).expect("cannot write the synthetic GGUF");
    total
}

fn measure_model(args: &Args, gguf_path: &Path, dir: &Path) {
    let sealed_path = dir.join("model.fsm");
    let key = ModelKey::generate();
    let opts = SealOptions::default();
    let mut seal_times = Vec::new();
    let mut plaintext = 0;
    for _ in 0..args.seal_runs {
        let _ = std::fs::remove_file(&sealed_path);
        let t = Instant::now();
        let report = seal_file(gguf_path, &sealed_path, &key, &opts, &mut |_, _| {}).expect("sealing failed");
        seal_times.push(t.elapsed().as_secs_f64());
        plaintext = report.plaintext_bytes;
    }
    let gb = plaintext as f64 / 1e9;
    let seal_s = median(&mut seal_times);
    println!("\n== {} ({:.3} GB of tensor data)", gguf_path.display(), gb);
    println!(
        "seal_file (read, encrypt, write, fsync), 1 MiB chunks: median {seal_s:.3} s = {:.2} GB/s  (runs: {})",
        gb / seal_s,
        seal_times.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>().join(" ")
    );

    let sealed = File::open(&sealed_path).expect("cannot open the sealed file");
    let prefix = SealedHeader::read_prefix(BufReader::new(&sealed)).expect("sealed header");
    let model = SealedModel::open(&prefix, &key).expect("opening the sealed header");
    let plain = File::open(gguf_path).expect("cannot open the GGUF");
    let data_offset = GgufHeader::read(BufReader::new(&plain)).expect("GGUF header").data_offset;
    // Warm the page cache for both files before timing.
    read_plain(&plain, data_offset);
    open_all_chunks(&model, &sealed, 1, false);

    let n = args.threads.len();
    let (mut raw, mut opened, mut in_place) = (vec![Vec::new(); n], vec![Vec::new(); n], vec![Vec::new(); n]);
    let mut plain_read = Vec::new();
    for _ in 0..args.runs {
        for (i, &threads) in args.threads.iter().enumerate() {
            raw[i].push(raw_open_gbps(threads));
        }
        let (bytes, time) = read_plain(&plain, data_offset);
        plain_read.push(bytes as f64 / 1e9 / time.as_secs_f64());
        for (i, &threads) in args.threads.iter().enumerate() {
            let time = open_all_chunks(&model, &sealed, threads, false);
            opened[i].push(gb / time.as_secs_f64());
            let time = open_all_chunks(&model, &sealed, threads, true);
            in_place[i].push(gb / time.as_secs_f64());
        }
    }
    let plain_gbps = median(&mut plain_read);
    println!("(b) plain GGUF data section read() from page cache: {plain_gbps:.2} GB/s");
    for (i, &threads) in args.threads.iter().enumerate() {
        let (raw_gbps, open_gbps, in_place_gbps) =
            (median(&mut raw[i]), median(&mut opened[i]), median(&mut in_place[i]));
        println!(
            "threads {threads}: (a) raw AES-256-GCM open 1 MiB {raw_gbps:.2} GB/s | (c) sealed read+open_chunk \
             {open_gbps:.2} GB/s (open/raw {:.2}, open/plain read {:.2}) | read+open_chunk_in_place \
             {in_place_gbps:.2} GB/s (open/raw {:.2}, open/plain read {:.2})",
            open_gbps / raw_gbps,
            open_gbps / plain_gbps,
            in_place_gbps / raw_gbps,
            in_place_gbps / plain_gbps
        );
    }
    std::fs::remove_file(&sealed_path).expect("cannot delete the sealed file");
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Reads the data section with `read` into a 1 MiB buffer; returns the
/// bytes read and the time taken.
fn read_plain(file: &File, data_offset: u64) -> (u64, Duration) {
    let mut file = file;
    let mut buf = vec![0u8; MIB];
    let t = Instant::now();
    file.seek(SeekFrom::Start(data_offset)).expect("seek");
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    std::hint::black_box(&buf);
    (total, t.elapsed())
}

/// Reads and opens every chunk (into a separate buffer, or `in_place` in the
/// read buffer), the chunks split into `threads` contiguous runs; returns
/// the wall time.
fn open_all_chunks(model: &SealedModel, file: &File, threads: usize, in_place: bool) -> Duration {
    let chunks = &model.header().chunks;
    let per_thread = chunks.len().div_ceil(threads);
    let t = Instant::now();
    std::thread::scope(|s| {
        for (run, slice) in chunks.chunks(per_thread.max(1)).enumerate() {
            s.spawn(move || {
                let chunk_size = model.header().chunk_size as usize;
                let mut sealed = vec![0u8; chunk_size + CHUNK_TAG_LEN];
                let mut out = vec![0u8; chunk_size];
                for (i, c) in slice.iter().enumerate() {
                    let sealed = &mut sealed[..c.sealed_len()];
                    file.read_exact_at(sealed, c.file_offset).expect("read chunk");
                    let index = run * per_thread + i;
                    if in_place {
                        model.open_chunk_in_place(index, sealed).expect("open chunk");
                    } else {
                        model.open_chunk(index, sealed, &mut out[..c.len as usize]).expect("open chunk");
                    }
                }
                std::hint::black_box(&out);
            });
        }
    });
    t.elapsed()
}

/// Aggregate GB/s of ring's AES-256-GCM open on valid 1 MiB buffers, in
/// place, over `threads` threads running at once. Only the opens are timed.
fn raw_open_gbps(threads: usize) -> f64 {
    let per_thread: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let key = aead::LessSafeKey::new(
                        aead::UnboundKey::new(&aead::AES_256_GCM, &[t as u8 + 1; 32]).expect("AES key"),
                    );
                    let nonce = |i: usize| {
                        let mut n = [0u8; 12];
                        n[..8].copy_from_slice(&(i as u64).to_be_bytes());
                        aead::Nonce::assume_unique_for_key(n)
                    };
                    let mut buf = vec![0x5au8; MIB];
                    let mut timed = Duration::ZERO;
                    for i in 0..RAW_BYTES_PER_THREAD / MIB {
                        let tag = key.seal_in_place_separate_tag(nonce(i), aead::Aad::empty(), &mut buf).expect("seal");
                        let start = Instant::now();
                        key.open_in_place_separate_tag(nonce(i), aead::Aad::empty(), tag, &mut buf, 0..)
                            .expect("a valid tag opens");
                        timed += start.elapsed();
                    }
                    std::hint::black_box(&buf);
                    RAW_BYTES_PER_THREAD as f64 / 1e9 / timed.as_secs_f64()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    per_thread.iter().sum()
}
