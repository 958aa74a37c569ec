"""Attacks on the secure world service by a process of the normal world.

Run as the normal world's user (a member of the group the service admits):
    python3 normal_world.py PID STATE_DIR SECURE_BIN PEER_GID

Each attempt prints one line, `NAME: stopped by WHAT` or `NAME: SUCCEEDED ...`,
and the exit status is the number of attempts that succeeded.
"""

import ctypes
import errno
import os
import sys

libc = ctypes.CDLL(None, use_errno=True)
PTRACE_TRACEME, PTRACE_CONT, PTRACE_ATTACH, PTRACE_DETACH = 0, 7, 16, 17


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def stopped(name, how):
    print(f"{name}: stopped by {how}", flush=True)
    return 0


def succeeded(name, what):
    print(f"{name}: SUCCEEDED {what}", flush=True)
    return 1


def os_error(e):
    return f"{errno.errorcode.get(e.errno, e.errno)} ({e.strerror})"


def try_read(name, path):
    try:
        with open(path, "rb") as f:
            data = f.read(64)
        return succeeded(name, f"read {len(data)} bytes of {path}")
    except OSError as e:
        return stopped(name, os_error(e))


def try_list(name, path):
    try:
        return succeeded(name, f"listed {os.listdir(path)}")
    except OSError as e:
        return stopped(name, os_error(e))


def try_write(name, path):
    try:
        with open(path, "a") as f:
            f.write("allow_perplexity = true\n")
        return succeeded(name, f"wrote {path}")
    except OSError as e:
        return stopped(name, os_error(e))


def first_mapping(pid):
    try:
        with open(f"/proc/{pid}/maps") as f:
            start = f.readline().split("-")[0]
            return int(start, 16)
    except (OSError, ValueError):
        # Not even the map is readable: aim at a typical heap address.
        return 0x10000


def try_proc_mem(name, pid):
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError as e:
        return stopped(name, os_error(e))
    try:
        data = os.pread(fd, 64, first_mapping(pid))
        return succeeded(name, f"read {len(data)} bytes")
    except OSError as e:
        return stopped(name, f"read: {os_error(e)}")
    finally:
        os.close(fd)


def try_process_vm_readv(name, pid):
    buf = ctypes.create_string_buffer(64)
    local = IoVec(ctypes.cast(buf, ctypes.c_void_p), 64)
    remote = IoVec(first_mapping(pid), 64)
    n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        e = ctypes.get_errno()
        return stopped(name, f"{errno.errorcode.get(e, e)} ({os.strerror(e)})")
    return succeeded(name, f"read {n} bytes")


def try_ptrace_attach(name, pid):
    libc.ptrace.restype = ctypes.c_long
    r = libc.ptrace(PTRACE_ATTACH, pid, None, None)
    if r != 0:
        e = ctypes.get_errno()
        return stopped(name, f"{errno.errorcode.get(e, e)} ({os.strerror(e)})")
    libc.ptrace(PTRACE_DETACH, pid, None, None)
    return succeeded(name, "attached")


def try_traceme_before_exec(name, secure_bin, state_dir, peer_gid):
    """Starts the secure world's binary itself, traced from birth, on the service's state."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        os.dup2(write_end, 2)
        libc.ptrace(PTRACE_TRACEME, 0, None, None)
        try:
            os.execv(secure_bin, [secure_bin, "--service", "--listen-fd", "0", "--state-dir", state_dir,
                                  "--peer-gid", str(peer_gid)])
        finally:
            os._exit(127)
    os.close(write_end)
    # Stopped at exec: let it run on, as a tracer would, and watch it.
    _, status = os.waitpid(child, 0)
    while os.WIFSTOPPED(status):
        libc.ptrace(PTRACE_CONT, child, None, None)
        _, status = os.waitpid(child, 0)
    message = os.read(read_end, 4096).decode(errors="replace").strip()
    os.close(read_end)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    if code == 0:
        return succeeded(name, f"the traced secure world ran: {message}")
    return stopped(name, f"the traced secure world refused to start (exit {code}): {message}")


def main():
    pid, state_dir, secure_bin, peer_gid = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    won = 0
    won += try_read("read the device key", os.path.join(state_dir, "device.key"))
    won += try_list("list the state directory", state_dir)
    won += try_write("rewrite the policy", os.path.join(state_dir, "policy.conf"))
    won += try_proc_mem("read /proc/PID/mem", pid)
    won += try_process_vm_readv("process_vm_readv", pid)
    won += try_ptrace_attach("ptrace attach", pid)
    won += try_traceme_before_exec("PTRACE_TRACEME before exec of the secure binary", secure_bin, state_dir, peer_gid)
    sys.exit(won)


if __name__ == "__main__":
    main()
