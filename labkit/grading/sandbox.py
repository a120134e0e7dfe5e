"""The sandbox a submission's kernel runs in: every process it starts dies with its grading.

``python labkit/grading/sandbox.py CONFIG -- COMMAND...`` (what ``labkit grade`` starts instead of the
kernel itself; the file is run as a script and uses only the standard library) runs COMMAND as PID 1
of a new PID namespace, in a new mount namespace:

- the instructor bank, the grades folder and the other submissions' folders are covered by empty
  read-only mounts, the request folder (the inputs the grader writes) is read-only, and /proc shows
  only the sandbox's own processes;
- memory (RLIMIT_DATA: torch reserves far more address space than it uses, so RLIMIT_AS would break
  it), CPU time, file size and (as a dedicated user) process count are limited;
- when this launcher dies, however it dies (the grader SIGKILLs it at the end or at the wall-clock
  bound), the kernel gets SIGKILL (PR_SET_PDEATHSIG), and when PID 1 of a namespace dies the kernel
  kills every process in it: children started with ``start_new_session=True``, daemons, all of them.

Modes (``detect_mode``): "uid" when the grader runs as root: the namespaces plus a dedicated
unprivileged user id per submission, which cannot read the instructor's files or write the grades;
"userns" for an unprivileged instructor where user namespaces are allowed: the same namespaces, the
kernel keeps the instructor's user id (so only the mounts above keep it from the instructor's files);
"none" otherwise: a process group and a best-effort kill, and ``labkit grade`` warns that a detached
child could outlive grading.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import signal
import sys
import time
from pathlib import Path

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
PR_SET_PDEATHSIG = 1

_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _check(_lib().unshare(flags), "unshare")


def _mount(source, target, fstype, flags, data=None) -> None:
    def enc(s):
        return s.encode() if isinstance(s, str) else s

    _check(_lib().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def _mount_flags(path: str) -> int:
    """The flags a bind remount must keep (in a user namespace, dropping a locked flag is refused)."""
    f = os.statvfs(path).f_flag
    flags = f & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
    if f & 4096:  # ST_RELATIME
        flags |= MS_RELATIME
    return flags


_MODE = None


def detect_mode() -> str:
    """"uid", "userns" or "none" (see the module docstring); LABKIT_SANDBOX forces one."""
    global _MODE
    forced = os.environ.get("LABKIT_SANDBOX", "")
    if forced in ("uid", "userns", "none"):
        return forced
    if _MODE is not None:
        return _MODE
    mode = "none"
    if sys.platform.startswith("linux"):
        flags = CLONE_NEWNS | CLONE_NEWPID | (0 if os.geteuid() == 0 else CLONE_NEWUSER)
        pid = os.fork()
        if pid == 0:  # probe in a throwaway child: unshare changes the caller for good
            try:
                _unshare(flags)
                os._exit(0)
            except BaseException:  # noqa: BLE001
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 0:
            mode = "uid" if os.geteuid() == 0 else "userns"
    _MODE = mode
    return mode


def _setup_child(cfg: dict) -> None:
    """In PID 1 of the new namespaces, before exec: mounts, limits, user id, working folder."""
    _lib().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 0 and cfg.get("launcher_pid") and not Path(f"/proc/{cfg['launcher_pid']}").exists():
        os._exit(1)  # the launcher died before the death signal was armed
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if cfg["mode"] == "uid":
        _expose(cfg.get("expose", []))
    job = cfg["job_dir"]
    job_fd = os.open(job, os.O_RDONLY | os.O_DIRECTORY)
    for p in cfg.get("hide", []):
        if os.path.isdir(p) and not job.startswith(os.path.join(p, "")):
            _mount("tmpfs", p, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=0555")
    base = cfg.get("base_dir")
    if base and os.path.isdir(base):  # hide the other submissions' folders, keep ours at its path
        _mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        os.makedirs(job, exist_ok=True)
        _mount(f"/proc/self/fd/{job_fd}", job, None, MS_BIND | MS_REC)
        _mount(None, base, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.close(job_fd)
    for p in cfg.get("read_only", []):
        if os.path.isdir(p):
            _mount(p, p, None, MS_BIND | MS_REC)
            _mount(None, p, None, MS_BIND | MS_REMOUNT | MS_RDONLY | _mount_flags(p))
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as e:  # /proc then still shows the host's processes: say so in the kernel log
        print(f"labkit sandbox: could not mount a private /proc ({e})", file=sys.stderr)
    _set_limits(cfg.get("limits", {}))
    uid, gid = cfg.get("uid"), cfg.get("gid")
    if cfg["mode"] == "uid" and uid is not None:
        os.setgroups([])
        os.setgid(int(gid))
        os.setuid(int(uid))
    os.chdir(cfg["work_dir"])


def _set_limits(limits: dict) -> None:
    import resource

    for name, key in (("data", resource.RLIMIT_DATA), ("cpu", resource.RLIMIT_CPU), ("fsize", resource.RLIMIT_FSIZE),
                      ("nproc", resource.RLIMIT_NPROC), ("as", resource.RLIMIT_AS)):
        value = limits.get(name)
        if value:
            resource.setrlimit(key, (int(value), int(value)))


def _blocking_ancestor(path: str) -> str | None:
    """The outermost folder that others cannot enter (e.g. /root, or a `mktemp -d` checkout, mode 0700) on the
    way to ``path``, ``path`` itself included, if any."""
    parts = Path(path).parts
    for i in range(2, len(parts) + 1):
        folder = os.path.join(*parts[:i])
        try:
            if not os.stat(folder).st_mode & 0o001:
                return folder
        except OSError:
            return None
    return None


def _expose(paths: list[str]) -> None:
    """Make ``paths`` (the Python installation, the kit) reachable by the sandbox user when they sit in a
    folder others cannot enter: that folder is replaced, in this mount namespace only, by an empty one
    holding just those paths (the rest of, say, /root stays out of sight)."""
    by_ancestor: dict[str, list[str]] = {}
    for p in paths:
        if os.path.isdir(p):
            a = _blocking_ancestor(p)
            if a:
                by_ancestor.setdefault(a, []).append(p)
    for ancestor, inside in sorted(by_ancestor.items(), key=lambda kv: len(kv[0])):
        targets = set()
        for p in inside:  # a needed folder that is itself closed to others: expose what it holds instead
            targets |= {os.path.join(p, name) for name in os.listdir(p)} if p == ancestor else {p}
        fds = [(p, os.path.isdir(p), os.open(p, os.O_PATH)) for p in sorted(targets) if os.path.exists(p)]
        _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        old = os.umask(0o022)
        try:
            for p, is_dir, fd in fds:
                if is_dir:
                    os.makedirs(p, exist_ok=True)
                else:  # a file is bound onto an empty file of its name
                    os.makedirs(os.path.dirname(p), exist_ok=True)
                    open(p, "a").close()
                _mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
                os.close(fd)
        finally:
            os.umask(old)
        _mount(None, ancestor, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _copy_connection_file(cmd: list[str], cfg: dict) -> list[str]:
    """The kernel's connection file, readable by the sandbox user (the grader's copy stays private)."""
    if "-f" not in cmd:
        return cmd
    i = cmd.index("-f") + 1
    src = Path(cmd[i])
    dst = Path(cfg["work_dir"]) / ".kernel-connection.json"
    dst.write_bytes(src.read_bytes())
    os.chmod(dst, 0o600)
    if cfg["mode"] == "uid" and cfg.get("uid") is not None:
        os.chown(dst, int(cfg["uid"]), int(cfg["gid"]))
    return cmd[:i] + [str(dst)] + cmd[i + 1:]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python labkit/grading/sandbox.py CONFIG -- COMMAND...", file=sys.stderr)
        return 2
    cfg = json.loads(Path(argv[0]).read_text())
    cmd = _copy_connection_file(argv[2:], cfg)
    mode = cfg["mode"]
    cfg["launcher_pid"] = os.getpid()
    if mode == "none":
        _set_limits(cfg.get("limits", {}))
        os.chdir(cfg["work_dir"])
        os.execvpe(cmd[0], cmd, os.environ)
    uid, gid = os.getuid(), os.getgid()
    if mode == "userns":
        _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID)
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    else:
        _unshare(CLONE_NEWNS | CLONE_NEWPID)
    child = os.fork()
    if child == 0:
        try:
            _setup_child(cfg)
            os.execvpe(cmd[0], cmd, os.environ)
        except BaseException as e:  # noqa: BLE001 - say why in the kernel log, then die
            print(f"labkit sandbox: could not start the kernel: {type(e).__name__}: {e}", file=sys.stderr)
            os._exit(127)
    Path(cfg["job_dir"], "sandbox.pid").write_text(str(child))

    def forward(signum, frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(s, forward)
    try:
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                status = 0
                break
    finally:
        try:
            os.kill(child, signal.SIGKILL)  # PID 1 gone: the kernel kills the whole namespace
        except ProcessLookupError:
            pass
    return os.waitstatus_to_exitcode(status) if status else 0


# ----------------------------------------------------------------------------------------------
# Grader side: after the kernel, make sure nothing of the submission is left


def processes_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                pids.append(int(entry))
                            break
            except OSError:
                continue
    return pids


def processes_in_pidns(ns_inode: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == ns_inode:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def kill_all(launcher_pid: int | None, child_pid: int | None, ns_inode: str | None, uid: int | None,
             timeout: float = 10.0) -> list[int]:
    """SIGKILL the launcher, the namespace's PID 1 and every process of the sandbox; wait until they are gone.

    Returns the pids still alive after ``timeout`` (empty when everything is gone).
    """
    for pid in (launcher_pid, child_pid):
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + timeout
    while True:
        left = []
        if ns_inode:
            left += processes_in_pidns(ns_inode)
        if uid is not None:
            left += processes_of_uid(uid)
        left = sorted(set(left) - {os.getpid()})
        if not left or time.monotonic() > deadline:
            return left
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


_SPEC_CLASS = None


def _kernel_spec_manager_class():
    import ipykernel.kernelspec
    from jupyter_client.kernelspec import KernelSpecManager

    class SandboxKernelSpecManager(KernelSpecManager):
        """ipykernel's spec for the running interpreter, started through this module's launcher."""

        sandbox_config = ""  # set per instance: the launcher's JSON config

        def get_kernel_spec(self, kernel_name):
            spec = ipykernel.kernelspec.get_kernel_dict()
            # the launcher runs as a script (stdlib only): importing labkit.grading would load torch first
            spec["argv"] = [sys.executable, "-I", os.path.abspath(__file__), self.sandbox_config, "--", *spec["argv"]]
            return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES, **spec)

    return SandboxKernelSpecManager


def __getattr__(name):  # jupyter_client is imported only by the grader, not by the launcher
    global _SPEC_CLASS
    if name == "SandboxKernelSpecManager":
        _SPEC_CLASS = _SPEC_CLASS or _kernel_spec_manager_class()
        return _SPEC_CLASS
    raise AttributeError(name)


if __name__ == "__main__":
    sys.exit(main())
