"""All-or-nothing output: everything is written under a temporary name beside DST and renamed at the end.

An error, a crash, Ctrl-C or SIGTERM leaves DST exactly as it was (absent, or the old one when --force was
given), plus at worst a hidden `.DST.kbit-tmp-PID` that is removed on the way out. What a SIGKILL or a power
cut leaves behind is removed by the next run into the same folder (the PID in the name is dead). While a
run writes DST it holds a lock (`.DST.kbit-lock`, flock), so a second run into the same DST is refused
instead of silently replacing the first one's result.

A folder that fills up over hours (a finetune run: checkpoints, log, adapter) cannot be one AtomicOutput; its
files are each replaced atomically with atomic_path / write_json / write_safetensors (temporary name, fsync,
rename), the same naming, so the same stale-temp sweep applies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import threading

from safetensors.torch import save_file

from kbitcli.errors import Terminated, bad_input

TMP = ".kbit-tmp-"
# what AtomicOutput and finetune's atomic_path leave when killed: `.NAME.kbit-tmp-PID[.SUFFIX]`, `NAME.kbit-old-PID`
STALE_TMP = re.compile(r"^\.(?P<base>.+?)\.kbit-tmp-(?P<pid>\d+)(?:\.[^/]*)?$")
STALE_OLD = re.compile(r"^(?P<base>.+)\.kbit-old-(?P<pid>\d+)$")
LOCK = re.compile(r"^\.(?P<base>.+)\.kbit-lock$")
LONGEST_SUFFIX = len(".manifest.json") + len(".kbit-tmp-") + 12  # the longest name made from DST's (sidecar temp)


def check_not_overlapping(dst: str, inputs) -> None:
    """--force removes DST before renaming the new output into place: refuse a DST that is, holds, or lies inside
    any input, before any work. inputs: paths, or (role, path) pairs ("source", "--data", "base model"); None
    and missing paths are skipped. Paths are compared resolved (symlinks, `.`, `..`)."""
    d = os.path.realpath(dst)
    for item in inputs:
        role, p = item if isinstance(item, tuple) else ("source", item)
        if not p or not os.path.exists(p):
            continue
        s = os.path.realpath(p)
        if d == s:
            how, harm = "is", "it would be overwritten"
        elif s.startswith(d.rstrip(os.sep) + os.sep):
            how, harm = "contains", "--force would delete it"
        elif d.startswith(s.rstrip(os.sep) + os.sep):
            how, harm = "lies inside", "writing there would change it"
        else:
            continue
        raise bad_input(f"{dst}: destination {how} the {role} ({p}); {harm}; choose a destination outside it")


def check_destination(dst: str, force: bool, folder: bool | None = None) -> None:
    """DST can be written: its folder exists and is writable, its name fits, it is absent unless force.
    folder=False (a single-file output) also refuses `DST/`, which says a folder is expected."""
    if folder is False and dst.endswith(("/", os.sep)):
        raise bad_input(f"{dst}: ends with '/', but the output is a single file (a file SRC gives a file); "
                        f"name the file, e.g. {dst}model.safetensors")
    _check_parent(dst)
    if os.path.lexists(dst) and not force:
        raise bad_input(f"{dst} already exists; pass --force to replace it, or choose another destination")


def _check_parent(dst: str) -> None:
    parent = os.path.dirname(os.path.abspath(dst))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise bad_input(f"{dst}: {parent} is a file, not a folder; choose another destination")
    if not os.path.isdir(parent):
        raise bad_input(f"{dst}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise bad_input(f"{dst}: folder {parent} is not writable; choose another destination")
    base = os.path.basename(os.path.abspath(dst))
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(base.encode()) + LONGEST_SUFFIX > name_max:
        raise bad_input(f"{dst}: the name is {len(base.encode())} bytes long; kbit needs room for its temporary "
                        f"names beside it: use at most {name_max - LONGEST_SUFFIX}")


class AtomicOutput:
    """with AtomicOutput(dst, folder=True, force=False) as out: write under out.tmp, then it is renamed."""

    def __init__(self, dst: str, folder: bool, force: bool):
        check_destination(dst, True, folder)  # the folder is usable; existence is checked under the lock
        self.dst = os.path.abspath(dst)
        parent, base = os.path.split(self.dst)
        remove_stale(parent)
        self.lock_path, self._lock_fd = _lock(self.dst, dst)
        try:
            check_destination(dst, force, folder)  # again under the lock: another run may just have finished
        except BaseException:
            self._unlock()
            raise
        self.tmp = os.path.join(parent, f".{base}{TMP}{os.getpid()}")
        self.folder = folder
        self.extra: list[tuple[str, str]] = []  # (tmp path, final path) of sidecar files
        self._previous_term = None

    def __enter__(self):
        _remove(self.tmp)
        if self.folder:
            os.makedirs(self.tmp)
        self._previous_term = _term_as_interrupt()
        return self

    def sidecar(self, final_path: str) -> str:
        """A second file renamed into place with the main output (e.g. a single file's manifest). Its temporary
        name is the main one plus the part of its name after DST's (`.q.kbit-tmp-PID.manifest.json`), so a
        stale one is recognised, and long names stay short enough."""
        base, final = os.path.basename(self.dst), os.path.basename(final_path)
        tmp = self.tmp + (final[len(base):] if final.startswith(base + ".") else "." + final)
        self.extra.append((tmp, final_path))
        return tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                _remove(self.tmp)
                for tmp, _ in self.extra:
                    _remove(tmp)
                return False
            old = self.dst + f".kbit-old-{os.getpid()}"
            if os.path.lexists(self.dst):
                os.replace(self.dst, old) if not os.path.isdir(self.dst) or self.folder else shutil.move(self.dst, old)
            os.replace(self.tmp, self.dst)
            for tmp, final in self.extra:
                os.replace(tmp, final)
            _remove(old)
            return False
        finally:
            _restore_term(self._previous_term)
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            _unlock(self.lock_path, self._lock_fd)
            self._lock_fd = None


def _lock(dst_abs: str, shown: str) -> tuple[str, int | None]:
    """Hold `.DST.kbit-lock` (flock) or refuse. The holder removes the file when done; whoever opened it just
    before that finds a different inode at the path after locking and tries again, so two runs never both
    believe they hold it."""
    parent, base = os.path.split(dst_abs)
    path = os.path.join(parent, f".{base}.kbit-lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise bad_input(f"{shown}: another kbit run is writing it (lock {path} is held); wait for it to finish, "
                            "or choose another destination") from None
        except OSError:  # a file system without locks (some network mounts): go on unlocked, as before locks
            os.close(fd)
            return path, None
        try:
            st, mine = os.stat(path), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return path, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _unlock(path: str, fd: int) -> None:
    try:
        os.unlink(path)  # while still holding it: see _lock
    except FileNotFoundError:
        pass
    os.close(fd)


def _lock_held(parent: str, base: str) -> bool:
    """True if a live process (in any PID namespace sharing this folder) holds the lock on parent/base."""
    path = os.path.join(parent, f".{base}.kbit-lock")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0  # someone else's live process (or a number no process can have)
    return True


def remove_stale(parent: str) -> None:
    """Remove what killed runs (SIGKILL, power cut) left in parent: temporary outputs of dead PIDs whose DST
    nobody holds, and unheld lock files. A `DST.kbit-old-PID` is the previous DST set aside just before the new
    one was renamed in: it is removed when DST exists, and put back when DST is missing. Each is reported."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = STALE_TMP.match(name) or STALE_OLD.match(name)
        if m is None or _alive(int(m["pid"])) or _lock_held(parent, m["base"]):
            continue
        path = os.path.join(parent, name)
        try:
            if STALE_OLD.match(name) and not os.path.lexists(os.path.join(parent, m["base"])):
                os.replace(path, os.path.join(parent, m["base"]))
                _report(f"put back {os.path.join(parent, m['base'])} from {name}, set aside by process {m['pid']} "
                        "that was killed before it finished")
                continue
            _remove(path)
            _report(f"removed {path}, left by process {m['pid']} that was killed before it finished")
        except OSError:
            pass  # someone else cleaned it up first, or we may not: not our output either way
    for name in names:
        m = LOCK.match(name)
        if m is not None and not _lock_held(parent, m["base"]):
            path = os.path.join(parent, name)
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(path)  # held while unlinked: a run that opened it just now retries (see _lock)
                finally:
                    os.close(fd)
            except OSError:
                pass


def _report(message: str) -> None:
    print(f"kbit: {message}", file=sys.stderr)


def _term_as_interrupt():
    """SIGTERM (timeout, kill, docker stop) raises Terminated, a KeyboardInterrupt, so it cleans up exactly like
    Ctrl-C. Only from the main thread, and only where nobody installed a handler of their own."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _raise_terminated(signum, frame):
    raise Terminated()


def _restore_term(previous) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


# ---- one file at a time (a training run's folder fills up over hours, so it cannot be one AtomicOutput: every
# file in it is replaced atomically instead, and a crash or Ctrl-C leaves each file as it was or complete)

@contextlib.contextmanager
def atomic_path(path: str):
    """with atomic_path(p) as tmp: write tmp; it becomes p only if the block finishes."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.kbit-tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


def write_safetensors(path: str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
