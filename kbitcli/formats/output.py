"""All-or-nothing output: everything is written under a temporary name beside DST and renamed at the end.

An error, a crash or Ctrl-C leaves DST exactly as it was (absent, or the old one when --force was given),
plus at worst a hidden `.DST.kbit-tmp-PID` that is removed on the way out.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import threading

from kbitcli.errors import bad_input


def check_destination(dst: str, force: bool) -> None:
    if os.path.lexists(dst) and not force:
        raise bad_input(f"{dst} already exists; pass --force to replace it, or choose another destination")
    parent = os.path.dirname(os.path.abspath(dst))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise bad_input(f"{dst}: {parent} is a file, not a folder; choose another destination")
    if not os.path.isdir(parent):
        raise bad_input(f"{dst}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise bad_input(f"{dst}: folder {parent} is not writable; choose another destination")


class AtomicOutput:
    """with AtomicOutput(dst, folder=True, force=False) as out: write under out.tmp, then it is renamed."""

    def __init__(self, dst: str, folder: bool, force: bool):
        check_destination(dst, force)
        self.dst = os.path.abspath(dst)
        parent, base = os.path.split(self.dst)
        self.tmp = os.path.join(parent, f".{base}.kbit-tmp-{os.getpid()}")
        self.folder = folder
        self.extra: list[tuple[str, str]] = []  # (tmp path, final path) of sidecar files

    def __enter__(self):
        _remove(self.tmp)
        if self.folder:
            os.makedirs(self.tmp)
        return self

    def sidecar(self, final_path: str) -> str:
        """A second file renamed into place with the main output (e.g. a single file's manifest)."""
        tmp = self.tmp + "." + os.path.basename(final_path)
        self.extra.append((tmp, final_path))
        return tmp

    def __exit__(self, exc_type, exc, tb):
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


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


# Hashing for the manifest can run beside the work: hashlib releases the GIL, so on two cores the sha256
# of the input (and of each finished shard) costs no wall time while tensors are quantized. One daemon
# thread (it never holds up Ctrl-C) works through the queue; sha256_file() takes a result from it when the
# same file (path, size, mtime) was queued, else hashes on the spot.
_queued: dict[tuple, dict] = {}
_jobs: queue.Queue | None = None


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def hash_in_background(path: str) -> None:
    global _jobs
    if _jobs is None:
        _jobs = queue.Queue()
        threading.Thread(target=_hash_worker, args=(_jobs,), daemon=True, name="kbit-sha256").start()
    slot = {"done": threading.Event()}
    _queued[_file_key(path)] = slot
    _jobs.put((path, slot))


def _hash_worker(jobs: queue.Queue) -> None:
    while True:
        path, slot = jobs.get()
        try:
            slot["sha256"] = _sha256_now(path)
        except OSError:
            pass  # gone or unreadable: sha256_file hashes (and reports) it itself
        slot["done"].set()


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    slot = _queued.pop(_file_key(path), None)
    if slot is not None:
        slot["done"].wait()
        if "sha256" in slot:
            return slot["sha256"]
    return _sha256_now(path, chunk)


def _sha256_now(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def file_record(path: str, root: str | None = None) -> dict:
    return {"name": os.path.relpath(path, root) if root else os.path.basename(path),
            "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def folder_records(root: str) -> list[dict]:
    """file_record of every file under root (sub-folders too), by relative path, sorted."""
    paths = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
    return [file_record(p, root) for p in sorted(paths)]


def verify_records(label: str, records: list[dict], path_of) -> dict:
    """Re-hash each manifest record's file (path_of(record) -> path); exit 1 naming every mismatch."""
    from kbitcli.errors import KbitError

    bad = []
    for rec in records:
        f = path_of(rec)
        if not os.path.exists(f):
            bad.append(f"{rec['name']}: missing")
        elif os.path.getsize(f) != rec["bytes"] or sha256_file(f) != rec["sha256"]:
            bad.append(f"{rec['name']}: sha256 differs from the manifest")
    if bad:
        raise KbitError(f"{label}: verification failed: {'; '.join(bad)}", exit_code=1)
    return {"ok": True, "files": len(records)}
