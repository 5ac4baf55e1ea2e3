"""The manifest: what kbit writes beside every output (kbit_manifest.json in a folder, FILE.manifest.json beside
a single file) and checks with `kbit inspect --verify`.

build() makes the common record (tool, version, time, the source files' sha256); write() adds the sha256 of
every output file and puts it in place; locate() finds it for a checkpoint; verify() re-hashes: every file of
the checkpoint must be listed (a manifest that lists nothing, or leaves a weight file out, vouches for
nothing), and every listed name must stay inside the checkpoint's folder.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import queue
import threading

from kbitcli import __version__
from kbitcli.errors import KbitError, bad_input
from kbitcli.io.folder import WEIGHT_SUFFIXES, inside

MANIFEST = "kbit_manifest.json"
SIDECAR = ".manifest.json"

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


def verify_records(label: str, records, path_of, required: list[str] = ()) -> dict:
    """Re-hash each manifest record's file (path_of(record) -> path); exit 1 naming every mismatch. Every path
    in `required` (the checkpoint's own files: weights, index, config) must be listed: a manifest that lists
    nothing, or leaves a weight file out, vouches for nothing."""
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                                and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
                                                for r in records):
        raise KbitError(f"{label}: verification failed: the manifest's outputs are damaged (each needs a name, bytes "
                        "and sha256); re-encode, or restore the manifest from the original", exit_code=1)
    if not records:
        raise KbitError(f"{label}: verification failed: the manifest lists no files, so it vouches for nothing; "
                        "re-encode, or restore the manifest from the original", exit_code=1)
    bad = []
    listed = set()
    for rec in records:
        try:
            f = path_of(rec)
        except KbitError:  # a name outside the checkpoint's folder: never hashed, a failure like any other
            bad.append(f"{rec['name'][:100]!r}: a path outside the checkpoint")
            continue
        listed.add(os.path.realpath(f))
        if not os.path.exists(f):
            bad.append(f"{rec['name']}: missing")
        elif not os.path.isfile(f):  # a folder ('.', 'tokenizer/'): hashing it was an IsADirectoryError
            bad.append(f"{rec['name']}: not a file")
        elif os.path.getsize(f) != rec["bytes"] or sha256_file(f) != rec["sha256"]:
            bad.append(f"{rec['name']}: sha256 differs from the manifest")
    for f in required:
        if os.path.realpath(f) not in listed:
            bad.append(f"{os.path.basename(f)}: not listed in the manifest")
    if bad:
        shown = "; ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        raise KbitError(f"{label}: verification failed: {shown}", exit_code=1)
    return {"ok": True, "files": len(records)}


def checkpoint_files(root: str, weight_files: list[str]) -> list[str]:
    """The files a manifest must list for the checkpoint at root (a folder): the weight files a reader reads, the
    index and config.json that say how to read them, and every other weight file in the folder."""
    out = list(weight_files)
    for name in ("model.safetensors.index.json", "config.json"):
        if os.path.exists(os.path.join(root, name)):
            out.append(os.path.join(root, name))
    for d, _, files in os.walk(root):
        out += [os.path.join(d, f) for f in files if f.endswith(WEIGHT_SUFFIXES + (".gguf",)) and not f.startswith(".")]
    return list(dict.fromkeys(os.path.realpath(f) for f in out))


# ---- build, write, locate, verify ------------------------------------------------------------------------

def build(fmt: str, source_path: str, source_files: list[str], recipe: dict, **fields) -> dict:
    """The record every output's manifest starts from; `fields` adds the format's own (tensors, calibration...)."""
    return {"tool": "kbit", "version": __version__, "format": fmt,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            # a model saved from Python (`python:pkg.Class`) has no path
            "source": {"path": source_path if source_path.startswith("python:") else os.path.abspath(source_path),
                       "files": [file_record(f) for f in source_files]},
            "recipe": recipe, **fields}


def locate(path: str) -> tuple[str, str]:
    """(manifest file, the folder its names are relative to) of the checkpoint at path: kbit_manifest.json
    in a folder, FILE.manifest.json beside a single file."""
    if os.path.isdir(path):
        return os.path.join(path, MANIFEST), path
    return path + SIDECAR, os.path.dirname(os.path.abspath(path))


def read_manifest(path: str) -> dict | None:
    """The manifest of the checkpoint at path (None if it has none); a damaged one is exit 1."""
    man_path, _ = locate(path)
    if not os.path.exists(man_path):
        return None
    try:
        with open(man_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: valid JSON nested too deep
        data = e
    if not isinstance(data, dict):
        raise KbitError(f"{man_path}: damaged (not a JSON object); restore it from the original or re-encode",
                        exit_code=1)
    return data


def verify(path: str, weight_files: list[str]) -> dict:
    """`--verify`: re-hash every file of the checkpoint at path against its manifest (any format kbit wrote)."""
    man_path, root = locate(path)
    if not os.path.exists(man_path):
        raise bad_input(f"{path}: no kbit manifest ({os.path.basename(man_path)}); --verify checks files kbit "
                        "wrote (re-encode with kbit to get one; other tools' checkpoints carry none)")
    try:
        man = read_manifest(path)
    except KbitError:
        man = None
    man = man if isinstance(man, dict) else {"outputs": None}  # damaged: verify_records says so
    folder = os.path.isdir(path)
    # every file of the checkpoint must be listed: a manifest that leaves one out vouches for nothing
    required = checkpoint_files(root, weight_files) if folder else [path]
    where = os.path.basename(man_path)
    return verify_records(path, man.get("outputs", []),
                          (lambda rec: inside(root, rec["name"], where)) if folder else (lambda rec: path), required)


def write(manifest: dict, root: str, final: str, sidecar: str | None = None) -> list[dict]:
    """Record the sha256 of the output's files in `manifest` and write it: into the folder `root`, or (a
    single-file output written at `root`, to be renamed to `final`) to `sidecar`. Returns the records."""
    if sidecar is None:
        records = folder_records(root)
        target = os.path.join(root, MANIFEST)
    else:
        records = [{**file_record(root), "name": os.path.basename(final)}]
        target = sidecar
    manifest["outputs"] = records
    with open(target, "w") as fh:
        json.dump(manifest, fh, indent=2)
    return records
