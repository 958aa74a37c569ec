//! `flexserve-launcher`: starts the secure world as its own principal.
//!
//! Run by root (by hand, from `scripts/secure-world.sh`, or as the systemd
//! unit in `packaging/`), never by the normal world. In order:
//!
//! 1. looks up the secure world's user and the group of peers it serves;
//! 2. makes the state directory the secure world's alone (mode 0700);
//! 3. binds the Unix socket, owned by the secure world's user and the peers'
//!    group, mode 0660, so that only members of that group can connect;
//! 4. raises the limits the secure world needs (descriptors: a granule is
//!    one while it is prepared; no core dumps);
//! 5. drops every privilege but one: supplementary groups, gid, uid, and
//!    every capability except CAP_IPC_LOCK, which it keeps as an ambient
//!    capability across exec (every page of `memfd_secret` memory counts as
//!    locked memory, and RLIMIT_MEMLOCK, 8 MiB by default, cannot always be
//!    raised: even root lacks CAP_SYS_RESOURCE in some containers); then
//!    checks that root cannot be regained;
//! 6. execs `flexserve-secure --service` with an empty environment, the
//!    socket as descriptor 3 and nothing else open but stderr.
//!
//! The secure world's binary must be root-owned and writable by root alone,
//! as must its directory: otherwise another user could swap it.

use std::ffi::CString;
use std::fs;
use std::os::fd::IntoRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

const USAGE: &str =
    "usage: flexserve-launcher [--state-dir DIR] [--socket PATH] [--user NAME] [--group NAME] [--secure-bin PATH]

Starts the FlexServe secure world under its own uid (run as root).
  --state-dir DIR    its keys and policy (default /var/lib/flexserve-secure; created, mode 0700)
  --socket PATH      where peers connect (default /run/flexserve/secure.sock)
  --user NAME        the secure world's own system user (default flexserve-secure)
  --group NAME       the group whose members may connect (default flexserve)
  --secure-bin PATH  the flexserve-secure executable (default: beside this one)";

struct Args {
    state_dir: PathBuf,
    socket: PathBuf,
    user: String,
    group: String,
    secure_bin: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        state_dir: PathBuf::from("/var/lib/flexserve-secure"),
        socket: PathBuf::from("/run/flexserve/secure.sock"),
        user: "flexserve-secure".to_string(),
        group: "flexserve".to_string(),
        secure_bin: None,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(flag) = it.next() {
        let flag = flag.to_str().ok_or("arguments must be UTF-8")?.to_string();
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--state-dir" => a.state_dir = value.into(),
            "--socket" => a.socket = value.into(),
            "--user" => a.user = value.to_str().ok_or("--user must be UTF-8")?.to_string(),
            "--group" => a.group = value.to_str().ok_or("--group must be UTF-8")?.to_string(),
            "--secure-bin" => a.secure_bin = Some(value.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(a)
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| fail(&e));
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        fail(
            "must run as root: it gives the secure world a uid of its own. Without root, use development \
             mode (`flexserve --dev ...`), which protects nothing",
        );
    }
    let (uid, user_gid) = lookup_user(&args.user).unwrap_or_else(|e| fail(&e));
    if uid == 0 {
        fail(&format!("user {} is root; the secure world needs a user of its own", args.user));
    }
    let peer_gid = lookup_group(&args.group).unwrap_or_else(|e| fail(&e));
    let secure_bin = match &args.secure_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("flexserve-secure")))
            .unwrap_or_else(|| fail("cannot find this executable's directory; pass --secure-bin")),
    };
    check_root_owned(&secure_bin).unwrap_or_else(|e| fail(&e));
    if let Some(dir) = secure_bin.parent() {
        check_root_owned(dir).unwrap_or_else(|e| fail(&e));
    }
    prepare_state_dir(&args.state_dir, uid, user_gid).unwrap_or_else(|e| fail(&e));
    let listener = bind_socket(&args.socket, uid, peer_gid).unwrap_or_else(|e| fail(&e));
    raise_limits().unwrap_or_else(|e| fail(&e));
    let listen_fd = listener.into_raw_fd();
    place_descriptor(listen_fd, 3).unwrap_or_else(|e| fail(&e));
    drop_privileges(uid, user_gid).unwrap_or_else(|e| fail(&e));
    eprintln!(
        "flexserve-launcher: starting {} as uid {uid}, serving group {} (gid {peer_gid}) on {}",
        secure_bin.display(),
        args.group,
        args.socket.display()
    );
    let argv: Vec<CString> = [
        secure_bin.as_os_str().as_bytes(),
        b"--service",
        b"--listen-fd",
        b"3",
        b"--state-dir",
        args.state_dir.as_os_str().as_bytes(),
        b"--peer-gid",
        peer_gid.to_string().as_bytes(),
    ]
    .iter()
    .map(|a| CString::new(*a).unwrap_or_else(|_| fail("an argument contains a NUL byte")))
    .collect();
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: argv and envp are NUL-terminated arrays of NUL-terminated strings that outlive the call.
    unsafe { libc::execve(argv[0].as_ptr(), argv_ptrs.as_ptr(), envp.as_ptr()) };
    fail(&format!("exec {}: {}", secure_bin.display(), std::io::Error::last_os_error()))
}

fn fail(message: &str) -> ! {
    eprintln!("flexserve-launcher: {message}");
    std::process::exit(2)
}

fn c_string(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

/// The user's uid and primary gid.
fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    let c = c_string(name)?;
    // SAFETY: getpwnam returns null or a pointer to static storage, read at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return Err(format!(
            "no user {name:?}: create the secure world's own user first \
             (useradd --system --no-create-home --shell /usr/sbin/nologin {name})"
        ));
    }
    // SAFETY: pw is non-null and points at a passwd record.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

fn lookup_group(name: &str) -> Result<u32, String> {
    let c = c_string(name)?;
    // SAFETY: getgrnam returns null or a pointer to static storage, read at once.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        return Err(format!(
            "no group {name:?}: create it (groupadd --system {name}) and add the users who may run models to it"
        ));
    }
    // SAFETY: gr is non-null and points at a group record.
    Ok(unsafe { (*gr).gr_gid })
}

/// Root-owned and writable by root alone (no symlink at the end).
fn check_root_owned(path: &Path) -> Result<(), String> {
    let meta = fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.file_type().is_symlink() {
        return Err(format!("{} is a symbolic link; give the real path", path.display()));
    }
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} must be owned by root and writable by root alone (owner uid {}, mode {:o}): \
             otherwise another user could replace the secure world",
            path.display(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("{}: NUL in path", path.display()))?;
    // SAFETY: lchown reads the NUL-terminated path; it never follows a final symlink.
    if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
        return Err(format!("chown {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    Ok(())
}

fn prepare_state_dir(dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(format!("state directory {} is a symbolic link", dir.display()))
        }
        Ok(m) if !m.is_dir() => return Err(format!("state directory {} is not a directory", dir.display())),
        Ok(_) => {}
        Err(_) => fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?,
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| format!("{}: {e}", dir.display()))?;
    chown(dir, uid, gid)?;
    // Files inside belong to the secure world too (a key restored from a backup as root, say).
    for entry in fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        chown(&path, uid, gid)?;
    }
    Ok(())
}

fn bind_socket(path: &Path, uid: u32, peer_gid: u32) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    match fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            fs::remove_file(path).map_err(|e| format!("removing the old socket {}: {e}", path.display()))?
        }
        Ok(_) => return Err(format!("{} exists and is not a socket", path.display())),
        Err(_) => {}
    }
    // Nobody may connect between bind and chmod.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| format!("binding {}: {e}", path.display()))?;
    chown(path, uid, peer_gid)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660)).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(listener)
}

fn raise_limits() -> Result<(), String> {
    let set = |resource, value: libc::rlim_t, name: &str| {
        let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: setrlimit reads the struct passed.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(format!("setrlimit({name}): {}", std::io::Error::last_os_error()));
        }
        Ok(())
    };
    // Every granule of secret memory is a descriptor while it is prepared:
    // as many as the hard limit allows (raising it needs CAP_SYS_RESOURCE).
    let mut nofile = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) } != 0 {
        return Err(format!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error()));
    }
    if set(libc::RLIMIT_NOFILE, nofile.rlim_max.max(1 << 20), "RLIMIT_NOFILE").is_err() {
        set(libc::RLIMIT_NOFILE, nofile.rlim_max, "RLIMIT_NOFILE")?;
    }
    set(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")
}

/// Puts `fd` on `target` (inheritable) and closes every other descriptor above 2.
fn place_descriptor(fd: i32, target: i32) -> Result<(), String> {
    // SAFETY: dup2/fcntl/close_range act on this process's descriptors only.
    unsafe {
        if fd != target {
            if libc::dup2(fd, target) < 0 {
                return Err(format!("dup2: {}", std::io::Error::last_os_error()));
            }
            libc::close(fd);
        }
        let flags = libc::fcntl(target, libc::F_GETFD);
        if flags < 0 || libc::fcntl(target, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
            return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
        }
        if libc::syscall(libc::SYS_close_range, target as u32 + 1, u32::MAX, 0) != 0 {
            return Err(format!("close_range: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The one capability the secure world keeps: locking memory beyond RLIMIT_MEMLOCK.
const CAP_IPC_LOCK: u32 = 14;
/// Highest capability number the kernel may know (bounding-set drops past the last one fail harmlessly).
const CAP_LAST: u32 = 63;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), String> {
    let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: these calls only change this process's credentials and
    // capabilities; capset reads the header and two data structs we own.
    unsafe {
        // While still root: no capability but CAP_IPC_LOCK can come back after exec.
        for cap in 0..=CAP_LAST {
            if cap != CAP_IPC_LOCK {
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
        }
        if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return Err(os("prctl(PR_SET_KEEPCAPS)"));
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(os("setgroups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(os("setresgid"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(os("setresuid"));
        }
        let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let bit = 1u32 << CAP_IPC_LOCK;
        let data = [CapData { effective: bit, permitted: bit, inheritable: bit }, CapData::default()];
        if libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) != 0 {
            return Err(os("capset(CAP_IPC_LOCK)"));
        }
        if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, CAP_IPC_LOCK as libc::c_ulong, 0, 0) != 0 {
            return Err(os("prctl(PR_CAP_AMBIENT_RAISE, CAP_IPC_LOCK)"));
        }
        if libc::setuid(0) == 0 || libc::geteuid() == 0 {
            return Err("root could be regained after dropping privileges".to_string());
        }
    }
    Ok(())
}
