//! The secure world as a process: seccomp, memory modes, recall, crashes.
//! Each test starts real `flexserve-secure` processes on the real model.

mod common;

use std::path::PathBuf;

use common::{generate, options, plain_generate, plain_model, request, sealed, Sealed};
use flexserve_normal::{
    resident_bytes, MemoryBudget, NormalError, OpenedModel, PoolChoice, SecureWorld, SecureWorldOptions,
};
use flexserve_protocol::{ErrorCode, GenerateRequest, Input};
use flexserve_sealed::{ModelKey, SealOptions};

/// Granules a KV cache of `positions` positions of the real model takes.
fn kv_granules(positions: usize, granule_size: u64) -> u32 {
    let file = flexserve_gguf::GgufFile::open(plain_model()).unwrap();
    let config = flexserve_engine::ModelConfig::from_metadata(&file.header.metadata).unwrap();
    let bytes = positions * flexserve_engine::KvCache::bytes_per_position(&config);
    bytes.div_ceil(granule_size as usize) as u32
}

/// The activations' plan of the real model for a generation that evaluates
/// `batch` prompt tokens with a cache of `positions`: (granules, bytes).
fn scratch_granules(batch: usize, positions: usize, granule_size: u64) -> (u32, usize) {
    let file = std::sync::Arc::new(flexserve_gguf::GgufFile::open(plain_model()).unwrap());
    let model = flexserve_engine::Model::from_gguf(file, 1).unwrap();
    let plan = model.scratch_plan(batch, positions, 1);
    let granules = plan.buffers.iter().map(|b| b.div_ceil(granule_size as usize) as u32).sum();
    (granules, plan.total())
}

/// Every call `flexserve-secure --self-test-seccomp` tries
/// (`flexserve_secure::seccomp::probe_forbidden_calls`), for this architecture.
fn probed_calls() -> std::collections::BTreeSet<&'static str> {
    let mut calls = vec![
        "openat",
        "statx(path)",
        "newfstatat(path)",
        "memfd_create",
        "socket",
        "connect",
        "bind",
        "listen",
        "execve",
        "execveat",
        "ptrace",
        "prctl(PR_SET_DUMPABLE)",
        "clone(fork)",
        "clone3",
        "process_vm_readv",
        "process_vm_writev",
        "tgkill(pid 1)",
        "tkill",
        "prlimit64(pid 1)",
        "prlimit64(no such pid)",
        "mmap(PROT_EXEC)",
        "mprotect(PROT_EXEC)",
        "pkey_mprotect",
        "getsockopt(SO_TYPE)",
        "fcntl(F_GETFL)",
    ];
    if cfg!(target_arch = "x86_64") {
        calls.extend(["open", "fork"]);
    }
    calls.into_iter().collect()
}

#[test]
fn seccomp_forbids_files_exec_sockets_tracing_forks_exec_memory_and_other_processes_but_not_threads() {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_flexserve-secure")).arg("--self-test-seccomp").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let report = String::from_utf8_lossy(&out.stderr);
    let mut lines = report.lines();
    assert_eq!(lines.next(), Some("thread ok"), "{report}");
    let mut probed = std::collections::BTreeSet::new();
    for line in lines {
        // "NAME errno N", or "NAME allowed" for a call that got through.
        let call = line.rsplit_once(" errno ").map_or_else(|| line.trim_end_matches(" allowed"), |(call, _)| call);
        // clone3 answers ENOSYS, so that the C library falls back to clone, whose flags the filter checks.
        let errno = if call == "clone3" { libc::ENOSYS } else { libc::EPERM };
        assert_eq!(line, format!("{call} errno {errno}"), "{report}");
        assert!(probed.insert(call), "{call} reported twice: {report}");
    }
    assert_eq!(probed, probed_calls(), "{report}");
}

/// Set in the copy of this test binary that runs
/// `the_secure_world_and_its_service_mode_still_work_under_the_filter` under the filter.
const UNDER_FILTER: &str = "FLEXSERVE_TEST_UNDER_SECCOMP";

#[test]
fn the_secure_world_and_its_service_mode_still_work_under_the_filter() {
    if std::env::var_os(UNDER_FILTER).is_some() {
        return under_the_filter();
    }
    // The filter is for the whole process and cannot be removed: run this
    // test again, alone, in a process of its own.
    let name = "the_secure_world_and_its_service_mode_still_work_under_the_filter";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(UNDER_FILTER, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}\n{stderr}");
    assert!(stderr.contains("under the filter: all done"), "{stderr}");
}

/// What the secure world does after start-up, and what its service mode
/// does (accept a connection on a listening Unix socket, check the peer's
/// credentials, receive the shared buffer's memfd over SCM_RIGHTS), done
/// under the filter. Panics where something fails.
fn under_the_filter() {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

    use flexserve_protocol::SharedBuffer;
    use flexserve_secure::platform::{Channel, SocketChannel};
    use flexserve_secure_mem::{GranulePool, PoolConfig};

    flexserve_secure::harden::protect_process().unwrap();
    // Before the filter: the listening socket (an abstract name: nothing to
    // clean up in the file system), a client that connects and sends a sealed
    // memfd with one byte, and our own uid to compare the peer's with.
    let addr = SocketAddr::from_abstract_name(format!("flexserve-seccomp-test-{}", std::process::id())).unwrap();
    let listener = UnixListener::bind_addr(&addr).unwrap();
    let client = UnixStream::connect_addr(&addr).unwrap();
    let mut shared = SharedBuffer::create(1 << 16).unwrap();
    shared.copy_in(0, b"ciphertext").unwrap();
    flexserve_normal::send_descriptor(&client, shared.fd()).unwrap();
    let file = std::fs::File::from(shared.inheritable_fd().unwrap());
    // SAFETY: getuid has no arguments and cannot fail.
    let uid = unsafe { libc::getuid() };
    let pool = GranulePool::new(PoolConfig::flexible().with_granule_size(64 << 10)).unwrap();

    flexserve_secure::harden::install_seccomp().unwrap();

    // The service mode: accept, the peer's credentials, the memfd.
    let (conn, _) = listener.accept().unwrap();
    let cred = flexserve_secure::service::peer_credentials(&conn).unwrap();
    assert_eq!((cred.pid as u32, cred.uid), (std::process::id(), uid));
    let received = flexserve_secure::service::receive_shared_buffer(&conn).unwrap();
    let mut head = [0u8; 10];
    received.copy_out(0, &mut head).unwrap();
    assert_eq!(&head, b"ciphertext");
    // A channel on the connection (it clones the stream), polled; then the peer goes away.
    let mut channel = SocketChannel::new(conn, received).unwrap();
    assert!(channel.poll_request().is_none());
    client.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(matches!(channel.poll_request(), Some(Err(_))));
    drop(channel);

    // Metadata of a descriptor: std (statx with AT_EMPTY_PATH) and fstat (glibc: newfstatat with AT_EMPTY_PATH).
    assert_eq!(file.metadata().unwrap().len(), 1 << 16);
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open and `stat` is a valid out-pointer.
    assert_eq!(unsafe { libc::fstat(file.as_raw_fd(), &mut stat) }, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(stat.st_size, 1 << 16);

    // Secure memory: granules prepared by several threads, a region of them.
    pool.grant(4).unwrap();
    let mut region = pool.alloc(3 << 16).unwrap();
    region.as_mut_slice().fill(7);
    pool.release(1);
    drop(region);

    // Worker threads, a heap, random seeds, time, limits and signals of this process only.
    let sums: Vec<u64> = std::thread::scope(|scope| {
        let workers: Vec<_> =
            (0..3u64).map(|t| scope.spawn(move || (0..1000u64).map(|i| i * t).sum::<u64>())).collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert_eq!(sums, [0, 499_500, 999_000]);
    let map: std::collections::HashMap<u32, u32> = (0..100).map(|i| (i, i)).collect();
    assert_eq!(map.len(), 100);
    let started = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert!(started.elapsed().as_millis() >= 2);
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    // SAFETY: signal 0 to the calling thread only checks that it exists.
    assert_eq!(unsafe { libc::pthread_kill(libc::pthread_self(), 0) }, 0);

    // The filter is still in force.
    // SAFETY: a constant path; a descriptor, were one returned, is closed at once.
    let fd = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    if fd >= 0 {
        // SAFETY: `fd` was just opened here and nothing else owns it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    assert_eq!((fd, errno), (-1, Some(libc::EPERM)));
    let mut stderr = std::io::stderr().lock();
    writeln!(stderr, "under the filter: all done").unwrap();
}

#[test]
fn recall_returns_memory_and_evicted_layers_reload_to_the_same_tokens() {
    let s = sealed();
    let prompt = "The three primary colors are";
    let expected = plain_generate(prompt, 12);
    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    assert_eq!(world.info().protection, "memfd_secret");
    let (model, load) = world.open_model(&s.model).unwrap();
    assert_eq!(load.chunks as u32, model.chunks);
    assert_eq!(generate(&mut world, &model, prompt, 12), expected);

    let before = world.status().unwrap();
    assert_eq!(before.models[0].resident_layers, 30);
    let granule = before.granule_size;
    let rss_before = resident_bytes(world.pid()).unwrap();
    // Take back more than half of what the model holds: free granules first, then layers.
    let want = before.in_use * 2 / 3;
    let (released, evicted, _) = world.recall(want).unwrap();
    assert_eq!(released, want, "the secure world gives back what is asked while it has layers to evict");
    assert!(evicted > 0);
    let after = world.status().unwrap();
    assert!(after.models[0].resident_layers < 30, "{after:?}");
    let rss_after = resident_bytes(world.pid()).unwrap();
    let dropped = rss_before.saturating_sub(rss_after);
    assert!(
        dropped as f64 >= 0.9 * (released as u64 * granule) as f64,
        "resident memory fell by {dropped} bytes after releasing {released} granules of {granule}"
    );

    // The evicted layers come back from the sealed file; the tokens do not change.
    assert_eq!(generate(&mut world, &model, prompt, 12), expected);
    let again = world.status().unwrap();
    assert_eq!(again.models[0].resident_layers, 30);
    world.shutdown().unwrap();
}

#[test]
fn a_killed_secure_world_is_a_clear_error_and_the_next_one_works() {
    let s = sealed();
    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    let (model, _) = world.open_model(&s.model).unwrap();
    let pid = world.pid() as i32;
    let mut pieces = 0;
    let result = world.generate(&model, request(&model, "Once upon a time", 400), |_| {
        pieces += 1;
        if pieces == 3 {
            // Mid-generation, as a crash or an out-of-memory kill would.
            std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
        }
    });
    match result {
        Err(NormalError::Died(how)) => assert!(how.contains("signal 9"), "{how}"),
        other => panic!("expected a clear error about the secure world's death, got {other:?}"),
    }
    let message = NormalError::Died("killed by signal 9".into()).to_string();
    assert!(message.contains("terminated") && message.contains("new secure world"), "{message}");

    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    let (model, _) = world.open_model(&s.model).unwrap();
    assert_eq!(generate(&mut world, &model, "Once upon a time", 4), plain_generate("Once upon a time", 4));
}

#[test]
fn static_carve_out_and_locked_memory_modes_give_the_same_tokens() {
    let s = sealed();
    let prompt = "def add(a, b):";
    let expected = plain_generate(prompt, 8);

    let carve =
        SecureWorldOptions { pool: PoolChoice::StaticCarveOut, budget: MemoryBudget::Bytes(256 << 20), ..options(&s) };
    let mut world = SecureWorld::spawn(&carve).unwrap();
    assert_eq!(world.info().pool_mode, "static-carve-out");
    let st = world.status().unwrap();
    assert_eq!(st.granted as u64 * st.granule_size, 256 << 20, "the whole carve-out is reserved at start");
    let (model, _) = world.open_model(&s.model).unwrap();
    assert_eq!(generate(&mut world, &model, prompt, 8), expected);
    let (released, _, _) = world.recall(10).unwrap();
    assert_eq!(released, 0, "a static carve-out never returns memory");
    world.shutdown().unwrap();

    let locked = SecureWorldOptions { force_locked_memory: true, ..options(&s) };
    let mut world = SecureWorld::spawn(&locked).unwrap();
    assert_eq!(world.info().protection, "locked-anonymous");
    let (model, _) = world.open_model(&s.model).unwrap();
    assert_eq!(generate(&mut world, &model, prompt, 8), expected);
    world.shutdown().unwrap();
}

#[test]
fn limits_and_keys_are_enforced_with_clear_errors() {
    let s = sealed();
    // A budget smaller than the model.
    let small = SecureWorldOptions { budget: MemoryBudget::Bytes(32 << 20), ..options(&s) };
    let mut world = SecureWorld::spawn(&small).unwrap();
    let e = world.open_model(&s.model).err().expect("the model does not fit 32 MiB");
    let text = e.to_string();
    assert!(text.contains("limit") && text.contains("granules"), "{text}");

    // A secure world holding another key cannot open the model.
    let other = tempfile::tempdir().unwrap();
    let other_key = other.path().join("other.key");
    ModelKey::generate().save(&other_key).unwrap();
    let wrong = SecureWorldOptions { model_keys: vec![other_key], ..options(&s) };
    let mut world = SecureWorld::spawn(&wrong).unwrap();
    match world.open_model(&s.model) {
        Err(NormalError::Secure { code: ErrorCode::Verification, message }) => {
            assert!(message.contains("key"), "{message}")
        }
        Err(e) => panic!("expected a verification error, got {e}"),
        Ok(_) => panic!("opened with the wrong key"),
    }

    // Status names the protection, the pool and the models.
    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    let (model, _) = world.open_model(&s.model).unwrap();
    let st = world.status().unwrap();
    assert_eq!((st.protection.as_str(), st.pool_mode.as_str()), ("memfd_secret", "flexible"));
    assert_eq!(st.models.len(), 1);
    assert_eq!(st.models[0].model, model.id);
    assert_eq!(st.models[0].resident_chunks, model.chunks);
    assert!(st.in_use as u64 >= u64::from(model.granules_needed));
    assert!(st.heap_bytes > 0);
}

#[test]
fn memory_pressure_during_a_generation_gets_free_granules_back_between_tokens() {
    let s = sealed();
    let prompt = "Here is a long story about a lighthouse keeper:";
    let expected = plain_generate(prompt, 48);
    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    let (model, _) = world.open_model(&s.model).unwrap();
    // A first generation touches the heap (KV cache, scratch) that the second reuses.
    assert_eq!(generate(&mut world, &model, prompt, 48), expected);
    // Free granules beyond what the model uses: what a recall can take at once.
    assert_eq!(world.grant(40).unwrap(), 40);
    let before = world.status().unwrap();
    let free = before.prepared - before.in_use;
    assert!(free >= 40, "{before:?}");
    let rss_before = resident_bytes(world.pid()).unwrap();

    // A floor no machine meets: the watch recalls at the first token it checks.
    world.set_memory_floor(Some(u64::MAX / 2));
    let mut text = String::new();
    let report = world.generate(&model, request(&model, prompt, 48), |t| text.push_str(t)).unwrap();
    assert_eq!(text, expected);
    let recalls = world.take_recalls();
    assert!(!recalls.is_empty(), "the pressure watch never recalled");
    let during: Vec<_> = recalls.iter().filter(|r| r.during_generation).collect();
    assert!(!during.is_empty(), "{recalls:?}");
    // The generation's KV cache and activations took their granules from the free ones first.
    let positions = report.prompt_tokens as usize + 48;
    let kv = kv_granules(positions, before.granule_size)
        + scratch_granules(report.prompt_tokens as usize, positions, before.granule_size).0;
    assert_eq!(during[0].released, free - kv, "every free granule, and only those, come back mid-generation");
    // Layers in use stay while generating; a recall that arrives as the
    // generation ends is served in full afterwards and may evict layers.
    assert!(during.iter().all(|r| r.evicted == 0), "{recalls:?}");
    let dropped = rss_before.saturating_sub(resident_bytes(world.pid()).unwrap());
    let back = free - kv;
    assert!(
        dropped as f64 >= 0.9 * (back as u64 * before.granule_size) as f64,
        "resident memory fell by {dropped} bytes after {back} granules went back"
    );
    world.shutdown().unwrap();
}

/// Q4_0 and Q4_K matrices are rearranged for the grouped kernels at load, as
/// llama.cpp rearranges them (Q4_1, Q8_0 and Q6_K stay row by row, as there);
/// the secure world does it in place, in the granted granules, so the weights
/// are held once and the tokens are the plain engine's.
#[test]
fn q4_0_models_are_rearranged_in_place_and_give_the_plain_tokens() {
    rearranged_in_place_with_the_plain_tokens("Q4_0", flexserve_engine::weights::Repacked::Q4_0x8);
}

#[test]
fn q4_k_m_models_are_rearranged_in_place_and_give_the_plain_tokens() {
    rearranged_in_place_with_the_plain_tokens("Q4_K_M", flexserve_engine::weights::Repacked::Q4_Kx8);
}

fn rearranged_in_place_with_the_plain_tokens(quant: &str, layout: flexserve_engine::weights::Repacked) {
    use flexserve_engine::{GenerateOptions, Generator, Model, SamplingParams, Session};
    let dir = tempfile::tempdir().unwrap();
    let real = flexserve_gguf::GgufFile::open(plain_model()).unwrap();
    let spec = flexserve_engine::synth::SynthSpec::from_shape("4,1024,8,4,4096", quant, 7).unwrap();
    let plain = dir.path().join("synth.gguf");
    flexserve_engine::synth::synth_model(&spec, Some(&real.header.metadata)).unwrap().write_file(&plain).unwrap();
    let (sealed_path, key_path) = (dir.path().join("synth.fsm"), dir.path().join("k.key"));
    let key = ModelKey::generate();
    key.save(&key_path).unwrap();
    flexserve_sealed::seal_file(&plain, &sealed_path, &key, &SealOptions::default(), &mut |_, _| {}).unwrap();

    let prompt = "Random weights still give a definite greedy answer:";
    let file = std::sync::Arc::new(flexserve_gguf::GgufFile::open(&plain).unwrap());
    let tok = flexserve_tokenizer::Tokenizer::from_gguf(&file.header.metadata).unwrap();
    let reference = Model::from_gguf(file, 2).unwrap();
    assert!(reference.weights.layer(0).unwrap().w_up.layout == flexserve_engine::weights::Layout::Packed(layout));
    let mut g = Generator::new(Session::new(&reference, 512), &tok);
    let opts = GenerateOptions { max_tokens: 12, sampling: SamplingParams::greedy(), stop: vec![] };
    let mut expected = String::new();
    g.generate(&tok.encode(prompt, true, true), &opts, |t| expected.push_str(t)).unwrap();

    let s = Sealed { dir: tempfile::tempdir().unwrap(), model: sealed_path, key: key_path };
    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    let (model, _) = world.open_model(&s.model).unwrap();
    let heap_before = world.status().unwrap().heap_bytes;
    assert_eq!(generate(&mut world, &model, prompt, 12), expected);
    let st = world.status().unwrap();
    // A second copy of the rearranged matrices would have grown the secure
    // heap by their size (it grows in arenas of 8 MiB).
    let header = &flexserve_gguf::GgufFile::open(&plain).unwrap().header;
    let rearranged: u64 = header
        .tensors
        .iter()
        .filter(|t| {
            let rows = t.dims.iter().skip(1).product::<u64>() as usize;
            flexserve_engine::model::rearranged_by_load(&t.name)
                && flexserve_quant::Repacked::for_matrix(t.ty, rows, t.dims[0] as usize).is_some()
        })
        .map(|t| t.byte_size())
        .sum();
    assert!(rearranged > 24 << 20, "{rearranged}");
    let grown = st.heap_bytes.saturating_sub(heap_before);
    assert!(
        grown < rearranged / 2,
        "the secure heap grew by {grown} bytes for {rearranged} bytes of rearranged weights"
    );
    drop(dir);
}

/// A chat's KV cache lives in granted granules: a turn that needs one asks
/// for the granules first; status counts them; a recall takes the caches of
/// idle conversations after the layers, and the next turn recomputes its
/// cache from the messages, giving what a fresh evaluation of the whole
/// conversation gives.
#[test]
fn kv_caches_live_in_granted_granules_and_a_recalled_one_is_recomputed() {
    use flexserve_engine::{GenerateOptions, Generator, Model, SamplingParams, Session};
    use flexserve_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
    let s = sealed();
    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    let (model, _) = world.open_model(&s.model).unwrap();
    let weights = world.status().unwrap();
    assert_eq!(weights.granted, weights.in_use, "only the weights' granules are granted before the first turn");
    let turn = |world: &mut SecureWorld, user: &str| {
        let mut r = request(&model, "", 24);
        r.conversation = 7;
        r.input = Input::ChatTurn { system: None, user: user.to_string() };
        let mut text = String::new();
        let report = world.generate(&model, r, |t| text.push_str(t)).unwrap();
        (text, report)
    };
    let (first, report) = turn(&mut world, "Name a color.");
    let st = world.status().unwrap();
    let kv = st.models[0].kv_granules;
    let positions = report.prompt_tokens as usize + 24;
    assert_eq!(kv, kv_granules(positions, st.granule_size), "{st:?}");
    assert_eq!(st.in_use, weights.in_use + kv, "the cache is held in granted granules: {st:?}");
    // The activations took granted granules too, for the turn only.
    let (scratch, _) = scratch_granules(report.prompt_tokens as usize, positions, st.granule_size);
    assert!(scratch > 0);
    assert_eq!(st.granted, st.in_use + scratch, "the normal world granted what cache and activations needed");

    // Layers go before caches (they reload bit for bit): a recall of the
    // free granules and the layers' worth leaves the cache, one of
    // everything takes it too.
    let (released, _, _) = world.recall(st.granted - kv).unwrap();
    assert_eq!(released, st.granted - kv);
    let mid = world.status().unwrap();
    assert_eq!((mid.models[0].kv_granules, mid.models[0].resident_layers), (kv, 0), "{mid:?}");
    let (released, evicted, _) = world.recall(kv).unwrap();
    assert_eq!((released, evicted), (kv, kv));
    let st = world.status().unwrap();
    assert_eq!((st.models[0].kv_granules, st.in_use), (0, 0), "{st:?}");

    let (second, report) = turn(&mut world, "Another one?");
    assert_eq!(report.cached_tokens, 0, "the whole conversation is evaluated again");
    assert!(world.status().unwrap().models[0].kv_granules > 0);

    // A long prompt's activations (megabytes) do not grow the secure heap:
    // they are in granules, returned when the generation ends.
    let heap_before = world.status().unwrap().heap_allocated;
    let long = "The lighthouse keeper counted the ships that passed. ".repeat(40);
    let mut text = String::new();
    let report = world.generate(&model, request(&model, &long, 4), |t| text.push_str(t)).unwrap();
    let after = world.status().unwrap();
    let (_, scratch_bytes) = scratch_granules(report.prompt_tokens as usize, report.prompt_tokens as usize + 4, 1);
    assert!(report.prompt_tokens > 300 && scratch_bytes > 8 << 20, "{report:?}: {scratch_bytes}");
    // What the request held in the heap at most: tokens, text, logits, kernel scales (a few MiB at most).
    let from_heap = after.heap_peak.saturating_sub(heap_before);
    assert!(
        from_heap < scratch_bytes as u64 / 4,
        "the request held up to {from_heap} heap bytes beside {scratch_bytes} bytes of activations"
    );
    eprintln!("long prompt: {from_heap} bytes of heap at most beside {scratch_bytes} bytes of activations in granules");

    // The reference: the plain model evaluating the whole conversation at once.
    let file = std::sync::Arc::new(flexserve_gguf::GgufFile::open(plain_model()).unwrap());
    let tok = Tokenizer::from_gguf(&file.header.metadata).unwrap();
    let template = ChatTemplate::from_gguf(&file.header.metadata, &tok).unwrap().unwrap();
    let messages = [
        ChatMessage::new("user", "Name a color."),
        ChatMessage::new("assistant", first.trim()),
        ChatMessage::new("user", "Another one?"),
    ];
    let ids = tok.encode(&template.render(&messages, true).unwrap(), true, true);
    let plain = Model::from_gguf(file, 2).unwrap();
    let mut g = Generator::new(Session::new(&plain, 512), &tok);
    let opts = GenerateOptions { max_tokens: 24, sampling: SamplingParams::greedy(), stop: vec![] };
    let mut expected = String::new();
    g.generate(&ids, &opts, |t| expected.push_str(t)).unwrap();
    assert_eq!(second, expected);
    world.shutdown().unwrap();
}

/// Tiny synthetic models (the real model's tokenizer and template), sealed
/// with one key, each with its metadata edited; and the options of a
/// development secure world of their own that holds that key.
struct SynthSealer {
    dir: tempfile::TempDir,
    key: ModelKey,
    real: flexserve_gguf::GgufFile,
}

impl SynthSealer {
    fn new() -> SynthSealer {
        let dir = tempfile::tempdir().unwrap();
        let key = ModelKey::generate();
        key.save(dir.path().join("m.key")).unwrap();
        SynthSealer { dir, key, real: flexserve_gguf::GgufFile::open(plain_model()).unwrap() }
    }

    fn seal(&self, name: &str, edit: impl FnOnce(&mut flexserve_gguf::GgufWriter)) -> PathBuf {
        let spec =
            flexserve_engine::synth::SynthSpec::tiny(flexserve_engine::Arch::Llama, flexserve_gguf::GgmlType::Q4_0);
        let mut writer = flexserve_engine::synth::synth_model(&spec, Some(&self.real.header.metadata)).unwrap();
        edit(&mut writer);
        let (gguf, fsm) = (self.dir.path().join(format!("{name}.gguf")), self.dir.path().join(format!("{name}.fsm")));
        writer.write_file(&gguf).unwrap();
        flexserve_sealed::seal_file(&gguf, &fsm, &self.key, &SealOptions::default(), &mut |_, _| {}).unwrap();
        fsm
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn options(&self) -> SecureWorldOptions {
        SecureWorldOptions {
            binary: Some(env!("CARGO_BIN_EXE_flexserve-secure").into()),
            state_dir: Some(self.state_dir()),
            model_keys: vec![self.dir.path().join("m.key")],
            threads: 2,
            budget: MemoryBudget::Bytes(256 << 20),
            ..SecureWorldOptions::default()
        }
    }
}

/// Scoring returns a perplexity, an extraction oracle: off by default, on
/// for a model whose vendor set `flexserve.allow_perplexity` in its
/// authenticated metadata, and on for every model when the policy says so.
#[test]
fn scoring_needs_the_policy_or_the_vendors_word() {
    let sealer = SynthSealer::new();
    let unmarked = sealer.seal("unmarked", |_| {});
    let marked = sealer
        .seal("marked", |w| w.set(flexserve_secure::world::ALLOW_PERPLEXITY_KEY, flexserve_gguf::Value::Bool(true)));
    let (state, opts) = (sealer.state_dir(), sealer.options());
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(30);
    let mut world = SecureWorld::spawn(&opts).unwrap();
    let (m, _) = world.open_model(&unmarked).unwrap();
    match world.perplexity(&m, text.clone(), 64) {
        Err(NormalError::Secure { code: ErrorCode::Policy, message }) => {
            assert!(message.contains("scoring is off"), "{message}")
        }
        other => panic!("scoring an unmarked model under the default policy: {other:?}"),
    }
    let (m, _) = world.open_model(&marked).unwrap();
    let (tokens, ..) = world.perplexity(&m, text.clone(), 64).unwrap();
    assert!(tokens > 64, "{tokens}");
    world.shutdown().unwrap();

    std::fs::write(state.join("policy.conf"), "allow_perplexity = true\n").unwrap();
    let mut world = SecureWorld::spawn(&opts).unwrap();
    let (m, _) = world.open_model(&unmarked).unwrap();
    assert!(world.perplexity(&m, text, 64).is_ok());
    world.shutdown().unwrap();
}

/// The tokenizer tables come with the model and are read in the secure
/// world: a sealed (so authenticated) model whose vocabulary holds a special
/// token past MAX_SPECIAL_TOKEN_BYTES is refused when it opens, with an error
/// naming the bound, and the same session then opens and runs a sound model.
#[test]
fn a_hostile_tokenizer_table_is_refused_and_the_secure_world_serves_on() {
    let sealer = SynthSealer::new();
    let meta = &sealer.real.header.metadata;
    let mut tokens: Vec<String> =
        meta.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap().into_iter().map(str::to_string).collect();
    let mut types = meta.get_i32_array("tokenizer.ggml.token_type").unwrap().unwrap();
    let last = tokens.len() - 1;
    tokens[last] = format!("<{}>", "x".repeat(flexserve_tokenizer::MAX_SPECIAL_TOKEN_BYTES));
    types[last] = 3; // control
    let hostile = sealer.seal("long-special", |w| {
        w.set("tokenizer.ggml.tokens", flexserve_gguf::Value::string_array(tokens));
        w.set("tokenizer.ggml.token_type", flexserve_gguf::Value::i32_array(types));
    });
    let sound = sealer.seal("sound", |_| {});
    let mut world = SecureWorld::spawn(&sealer.options()).unwrap();
    match world.open_model(&hostile) {
        Err(NormalError::Secure { message, .. }) => {
            assert!(message.contains("MAX_SPECIAL_TOKEN_BYTES") && message.contains(&last.to_string()), "{message}")
        }
        Err(e) => panic!("expected the secure world to refuse the model, got {e}"),
        Ok(_) => panic!("a special token past the bound was accepted"),
    }
    let (model, _) = world.open_model(&sound).unwrap();
    generate(&mut world, &model, "Once upon a time", 4);
    assert_eq!(world.status().unwrap().models.len(), 1, "the refused model left nothing behind");
    world.shutdown().unwrap();
}

/// A chat template comes with the model and runs in the secure world: one
/// that loops for ever or grows without bound is refused with an error that
/// names the bound, and the secure world goes on serving.
#[test]
fn a_hostile_chat_template_is_refused_and_the_secure_world_serves_on() {
    let sealer = SynthSealer::new();
    let hostile = "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}";
    let fsm = sealer
        .seal("hostile", |w| w.set("tokenizer.chat_template", flexserve_gguf::Value::String(hostile.to_string())));
    let mut world = SecureWorld::spawn(&sealer.options()).unwrap();
    let (model, _) = world.open_model(&fsm).unwrap();
    let mut chat = request(&model, "", 4);
    chat.input = Input::ChatTurn { system: None, user: "Hello".to_string() };
    let t0 = std::time::Instant::now();
    match world.generate(&model, chat, |_| {}) {
        Err(NormalError::Secure { code: ErrorCode::Engine, message }) => {
            assert!(message.contains("fuel") || message.contains("exceeds the limit"), "{message}")
        }
        other => panic!("a hostile template must be refused: {other:?}"),
    }
    eprintln!("hostile template refused after {:.2} s", t0.elapsed().as_secs_f64());
    // The same session goes on: a raw prompt on the same model generates
    // (the helper fails the test on any error), and status answers.
    generate(&mut world, &model, "Once upon a time", 4);
    assert_eq!(world.status().unwrap().models.len(), 1);
    world.shutdown().unwrap();
}

/// A session keeps at most `MAX_CONVERSATIONS` conversations, across its
/// models: a turn that would start one more is refused with an error that
/// names the bound, while turns of kept conversations and requests that keep
/// nothing (conversation 0) go on; ending a conversation, or unloading its
/// model, frees its slot.
#[test]
fn a_session_keeps_a_bounded_number_of_conversations_and_ending_one_frees_a_slot() {
    use flexserve_protocol::{Reply, Request};
    use flexserve_secure::world::MAX_CONVERSATIONS;
    let sealer = SynthSealer::new();
    let (fsm_a, fsm_b) = (sealer.seal("a", |_| {}), sealer.seal("b", |_| {}));
    // Each kept conversation holds a KV cache of at least one granule: small ones.
    let opts = SecureWorldOptions { granule_size: 64 << 10, ..sealer.options() };
    let mut world = SecureWorld::spawn(&opts).unwrap();
    let (a, _) = world.open_model(&fsm_a).unwrap();
    let (b, _) = world.open_model(&fsm_b).unwrap();
    let turn = |model: &OpenedModel, conversation: u32| GenerateRequest {
        conversation,
        n_ctx: 16,
        ..request(model, "Once upon a time", 1)
    };
    let served = |world: &mut SecureWorld, model: &OpenedModel, conversation: u32| {
        if let Err(e) = world.generate(model, turn(model, conversation), |_| {}) {
            panic!("conversation {conversation} on model {}: {e}", model.id)
        }
    };
    let refused = |world: &mut SecureWorld, model: &OpenedModel, conversation: u32| -> String {
        match world.generate(model, turn(model, conversation), |_| {}) {
            Err(NormalError::Secure { code: ErrorCode::BadArgument, message }) => message,
            other => panic!("conversation {conversation} beyond the bound: {other:?}"),
        }
    };
    let models = [&a, &b];
    for id in 1..=MAX_CONVERSATIONS as u32 {
        served(&mut world, models[id as usize % 2], id);
    }
    let message = refused(&mut world, &a, 1000);
    assert!(message.contains("MAX_CONVERSATIONS") && message.contains(&MAX_CONVERSATIONS.to_string()), "{message}");
    refused(&mut world, &b, 1000);
    // Kept conversations go on, and so do requests that keep nothing.
    served(&mut world, &a, 2);
    served(&mut world, &b, 1);
    served(&mut world, &a, 0);
    refused(&mut world, &a, 1000);
    // Ending one (on model a) frees a slot (used on model b), and only one.
    assert!(matches!(world.call(&Request::EndConversation { model: a.id, conversation: 2 }), Ok(Reply::Ok)));
    served(&mut world, &b, 1000);
    refused(&mut world, &a, 1001);
    // Unloading a model ends its conversations.
    assert!(matches!(world.call(&Request::Unload { model: a.id }), Ok(Reply::Ok)));
    for id in 1001..1001 + MAX_CONVERSATIONS as u32 / 2 - 1 {
        served(&mut world, &b, id);
    }
    refused(&mut world, &b, 2000);
    world.shutdown().unwrap();
}

/// A conversation keeps no more text than its prompt can use: what the
/// prompt's tokens can spell. With a chat template that trims what it renders
/// (as Llama 3's does), a message padded with whitespace that never reaches
/// the prompt would otherwise be kept, turn after turn; it is refused with an
/// error that names the bound, and the conversation keeps what it had and
/// goes on. Requests that keep nothing (conversation 0) are not held to it.
#[test]
fn a_conversation_keeps_no_more_text_than_its_prompt_can_use() {
    use flexserve_protocol::{Reply, Request};
    let sealer = SynthSealer::new();
    let trimming = "{% for m in messages %}{{ m['content'] | trim }}\n{% endfor %}";
    let fsm = sealer
        .seal("trimming", |w| w.set("tokenizer.chat_template", flexserve_gguf::Value::String(trimming.to_string())));
    let mut world = SecureWorld::spawn(&sealer.options()).unwrap();
    let (model, _) = world.open_model(&fsm).unwrap();
    let chat = |conversation: u32, user: &str| GenerateRequest {
        conversation,
        input: Input::ChatTurn { system: None, user: user.to_string() },
        ..request(&model, "", 4)
    };
    let padded = format!("Hello{}", " ".repeat(64 << 10));
    world.generate(&model, chat(5, "Hello"), |_| {}).unwrap();
    match world.generate(&model, chat(5, &padded), |_| {}) {
        Err(NormalError::Secure { code: ErrorCode::BadArgument, message }) => {
            assert!(message.contains("conversation 5 would keep") && message.contains("longest token"), "{message}")
        }
        other => panic!("a turn whose text the prompt cannot use must be refused: {other:?}"),
    }
    // Nothing is kept by conversation 0: the same message is served.
    world.generate(&model, chat(0, &padded), |_| {}).unwrap();
    // The conversation goes on from what it kept.
    let report = world.generate(&model, chat(5, "Hello again"), |_| {}).unwrap();
    assert!(report.cached_tokens > 0, "the kept turn's cache is reused: {report:?}");
    // A new conversation whose first turn is refused is not kept.
    assert!(matches!(world.generate(&model, chat(6, &padded), |_| {}), Err(NormalError::Secure { .. })));
    match world.call(&Request::EndConversation { model: model.id, conversation: 6 }) {
        Err(NormalError::Secure { code: ErrorCode::NoSuchModel, .. }) => {}
        other => panic!("the refused conversation 6 was kept: {other:?}"),
    }
    assert!(matches!(world.call(&Request::EndConversation { model: model.id, conversation: 5 }), Ok(Reply::Ok)));
    world.shutdown().unwrap();
}
