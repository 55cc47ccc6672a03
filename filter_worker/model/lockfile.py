"""Lock files: what a model directory must contain, byte for byte, so a worker loads exactly the reviewed weights.

``filter-worker model pull`` downloads a model once (on a machine with hub access) and writes
``filter-worker.lock.json`` next to the files: the model id, the resolved commit, and every file's size
and sha256. Wherever the directory is copied, ``verify`` (and the worker at start-up) recompute the
hashes, so a truncated copy, a swapped weight file or a flipped bit stops the worker before it
classifies anything. Pure file handling; no torch.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_NAME = "filter-worker.lock.json"
LOCK_FORMAT = 1

# What a sequence classifier needs: config, tokenizer files, safetensors weights. Pickle weights
# (*.bin, *.pt, ...) are never downloaded: loading them can run code.
PULL_PATTERNS: tuple[str, ...] = ("*.json", "*.safetensors", "*.txt", "*.model")
# Files that, if present but not locked, could still be loaded; ``verify`` reports them. ONNX graphs
# (``filter-worker model export``) run in place of the weights with FILTER_MODEL__BACKEND=onnx.
_LOADABLE_PATTERNS: tuple[str, ...] = (
    *PULL_PATTERNS,
    "*.onnx",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.pkl",
    "*.h5",
    "*.msgpack",
)
# A fast tokenizer loads from tokenizer.json, or is converted from one of these vocabularies.
_TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CHUNK = 1 << 20


class LockError(Exception):
    """A lock file is missing or unreadable, or a pull failed; the message says what to do."""


@dataclass(frozen=True, slots=True)
class LockedFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Lock:
    model_id: str
    revision: str
    files: tuple[LockedFile, ...]

    @property
    def weights_sha256(self) -> str:
        return weights_sha256({f.path: f.sha256 for f in self.files})


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One way a directory differs from its lock; ``str()`` is the line an operator reads."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def is_commit(revision: str | None) -> bool:
    """Only a full commit hash pins a model: branches and tags can move."""
    return revision is not None and _COMMIT.fullmatch(revision) is not None


def sha256_file(path: Path) -> str:
    """Streamed, so a multi-GB weight file never sits in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(hashes: dict[str, str]) -> str:
    """The identity of the weights among ``hashes`` (relative path -> sha256): the top-level safetensors files.

    One file: its own sha256, the number the hub shows on the file's page and ``sha256sum`` prints.
    Shards: the sha256 of ``sha256sum``'s output over them in name order (``sha256sum *.safetensors |
    sha256sum``), so both can be reproduced with standard tools. Empty when there are no such files.
    """
    names = sorted(name for name in hashes if name.endswith(".safetensors") and "/" not in name)
    if len(names) == 1:
        return hashes[names[0]]
    if not names:
        return ""
    listing = "".join(f"{hashes[name]}  {name}\n" for name in names)
    return hashlib.sha256(listing.encode()).hexdigest()


def directory_weights_sha256(directory: str | Path) -> str:
    """``weights_sha256`` of a directory without a lock (a hub snapshot, an unlocked copy): hashes the files."""
    root = Path(directory)
    return weights_sha256({p.name: sha256_file(p) for p in root.glob("*.safetensors") if p.is_file()})


def missing_model_files(directory: str | Path) -> list[str]:
    """What a model directory lacks to be loaded (config, tokenizer, safetensors weights); empty when complete.

    Checked before transformers reads the directory, whose own errors for an incomplete one are cut
    off mid-sentence ("Couldn't instantiate the backend tokenizer from one of: ...").
    """
    root = Path(directory)
    missing = []
    if not (root / "config.json").is_file():
        missing.append("config.json")
    if not any(p.is_file() for pattern in _TOKENIZER_FILES for p in root.glob(pattern)):
        missing.append("tokenizer.json")
    if not any(p.is_file() for p in root.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    return missing


def _files(directory: Path) -> list[Path]:
    # Hidden paths (a ``.cache/`` left by hub tools, ``.git``) and the lock itself are not model files.
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.name != LOCK_NAME
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def lock_directory(directory: str | Path, model_id: str, revision: str) -> Lock:
    """Hash every file in ``directory`` and write its lock file; returns the lock."""
    root = Path(directory)
    files = tuple(LockedFile(p.relative_to(root).as_posix(), p.stat().st_size, sha256_file(p)) for p in _files(root))
    return _write_lock(root, Lock(model_id, revision, files))


def add_files(directory: str | Path, paths: list[str]) -> Lock:
    """Hash ``paths`` (relative to ``directory``) into its lock file, replacing their old entries.

    For files derived from locked ones (an exported ONNX graph): the model id and revision stay, and
    no other entry changes, so nothing unverified is locked along with them.
    """
    root = Path(directory)
    lock = read_lock(root)
    added = tuple(LockedFile(p, (root / p).stat().st_size, sha256_file(root / p)) for p in paths)
    kept = tuple(f for f in lock.files if f.path not in paths)
    return _write_lock(root, Lock(lock.model_id, lock.revision, tuple(sorted((*kept, *added), key=lambda f: f.path))))


def _write_lock(root: Path, lock: Lock) -> Lock:
    document = {
        "format": LOCK_FORMAT,
        "model_id": lock.model_id,
        "revision": lock.revision,
        "weights_sha256": lock.weights_sha256,
        "files": [asdict(f) for f in lock.files],
    }
    (root / LOCK_NAME).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return lock


def read_lock(directory: str | Path) -> Lock:
    path = Path(directory) / LOCK_NAME
    if not path.is_file():
        raise LockError(f"{directory} has no {LOCK_NAME}; write one with: filter-worker model pull NAME --to DIR")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != LOCK_FORMAT:
            raise ValueError(f"unsupported format {document.get('format')!r}")
        files = tuple(LockedFile(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in document["files"])
        return Lock(str(document["model_id"]), str(document["revision"]), files)
    except (ValueError, KeyError, TypeError) as exc:
        raise LockError(f"{path} is not a valid lock file: {exc}") from None


def verify_directory(directory: str | Path, lock: Lock) -> list[Mismatch]:
    """Every difference between ``directory`` and ``lock``; empty when they match.

    Sizes are compared first so a truncated copy is reported without hashing it. A loadable file that
    the lock does not list is a mismatch too: the loader might pick it up (a pickle, a second config).
    """
    root = Path(directory)
    problems: list[Mismatch] = []
    for entry in lock.files:
        path = root / entry.path
        if not path.is_file():
            problems.append(Mismatch(entry.path, "missing"))
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append(Mismatch(entry.path, f"size {size} bytes, locked {entry.size}"))
            continue
        digest = sha256_file(path)
        if digest != entry.sha256:
            problems.append(Mismatch(entry.path, f"sha256 {digest}, locked {entry.sha256}"))
    locked = {f.path for f in lock.files}
    for path in _files(root):
        name = path.relative_to(root).as_posix()
        if name not in locked and any(fnmatch.fnmatch(path.name, pattern) for pattern in _LOADABLE_PATTERNS):
            problems.append(Mismatch(name, "not in the lock file"))
    return problems


def pull(
    model_id: str,
    revision: str | None,
    to: str | Path,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Lock:
    """Download ``model_id`` at ``revision`` (config, tokenizer, safetensors only) into ``to`` and lock it.

    The download goes through the Hugging Face cache (``HF_HUB_CACHE``, or ``cache_dir``), whose
    snapshot folder is named by the resolved commit, so the lock records the commit even when a branch
    was asked for. ``local_files_only`` takes the snapshot from that cache without the network.
    """
    from huggingface_hub import snapshot_download

    target = Path(to)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise LockError(f"--to {to}: not an empty directory; pull into a new one")
    try:
        snapshot = Path(
            snapshot_download(
                model_id,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=list(PULL_PATTERNS),
                local_files_only=local_files_only,
            )
        )
    except (OSError, ValueError) as exc:  # hub errors derive from these
        if local_files_only:  # the hub client's own text here is advice for its Python API
            from huggingface_hub import constants

            raise LockError(
                f"the Hugging Face Hub is unreachable from here and '{model_id}' (revision {revision or 'main'}) is "
                f"not in the local cache {cache_dir or constants.HF_HUB_CACHE}; run this pull on a machine with hub "
                "access and copy the directory here, or try the pipeline offline with 'filter-worker model synth DIR'"
            ) from exc
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LockError(f"could not download '{model_id}' (revision {revision or 'main'}): {cause}") from exc
    commit = snapshot.name
    # A cached snapshot may hold more than this pull asked for (an earlier full download): copy only
    # top-level files the loader reads, and never a pickle.
    chosen = sorted(
        p for p in snapshot.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, x) for x in PULL_PATTERNS)
    )
    if not any(p.name.endswith(".safetensors") for p in chosen):
        raise LockError(
            f"'{model_id}' at {commit} has no safetensors weights; "
            "only safetensors are loaded (pickle files can run code)"
        )
    target.mkdir(parents=True, exist_ok=True)
    for path in chosen:
        shutil.copyfile(path, target / path.name)  # follows the cache's symlinks to the blobs
    return lock_directory(target, model_id, commit)
