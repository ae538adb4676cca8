"""A model's output rows memoised by the exact token prefix that produced them.

Emulated hardware holds each forward pass to a modelled time, but the real model
still computes every row on this machine; under load that real compute, not the
modelled hardware, sets the pace. Both daemons can therefore keep every row they
compute in a `RowStore` and, the next time the same prefix comes by, take the row
from there instead of the model.

Keys. A row is what the model outputs after a prefix of tokens, so its key is the
prefix itself, hashed as a running chain (`PrefixKeys`):

    k_0 = H(root || t_0),  k_i = H(k_{i-1} || t_i)        H = BLAKE2b-128

so extending a sequence by one token costs one hash, and a rollback is a cut of
the chain. `root` is the model's identity (`model_identity`), so a key of one
model can never name a row of another.

Layout. `DIR/<model>-<identity hash>/` holds `meta.json` (the identity in full),
`rows.f32` (n_vocab float32 per row, appended) and `keys.bin` (16 bytes per row,
row i's key at i*16). A row is written before its key, so a process killed in
between leaves only an orphan row, which the next open cuts off. One process at a
time writes a store (an flock on `lock`); another one that opens it meanwhile
reads the rows that were there when it opened and keeps what it computes to
itself.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

log = logging.getLogger("tandem.rowstore")

KEY_BYTES = 16
FORMAT = 1


class RowStoreError(ValueError):
    """A cache directory that cannot be used for this model (another model's, unreadable, corrupt)."""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_identity(path: Path, role: str, **settings) -> dict:
    """What decides a llama.cpp model's rows: the weights (by content), the
    llama.cpp build and the CPU features it uses (the last bits of a logit differ
    between builds and machines), and the context settings the caller passes."""
    import llama_cpp  # late: the shared library is not free to load
    return {"role": role, "model": Path(path).name, "sha256": file_sha256(Path(path)),
            "llama_cpp": llama_cpp.__version__,
            "system": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
            **{k: settings[k] for k in sorted(settings)}}


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class PrefixKeys:
    """The running key chain of one token sequence: key(i) names the prefix tokens[:i+1]."""

    def __init__(self, root: bytes):
        self.root = root
        self._keys: list[bytes] = []

    def __len__(self) -> int:
        return len(self._keys)

    def extend(self, tokens: Iterable[int]) -> None:
        prev = self._keys[-1] if self._keys else self.root
        for t in tokens:
            prev = hashlib.blake2b(prev + int(t).to_bytes(4, "little"), digest_size=KEY_BYTES).digest()
            self._keys.append(prev)

    def truncate(self, n: int) -> None:
        del self._keys[n:]

    def key(self, i: int) -> bytes:
        return self._keys[i]

    def copy(self) -> "PrefixKeys":
        k = PrefixKeys(self.root)
        k._keys = list(self._keys)
        return k

    def common(self, other: "PrefixKeys", limit: int) -> int:
        """Length of the longest prefix (at most `limit`) the two sequences share. Equal keys at
        i mean equal prefixes up to i, so the answer is found by bisection."""
        lo, hi = 0, min(limit, len(self), len(other))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._keys[mid - 1] == other._keys[mid - 1]:
                lo = mid
            else:
                hi = mid - 1
        return lo


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "model"


class RowStore:
    """Rows of one model under one cache directory (see the module docstring)."""

    def __init__(self, cache_dir: Path, identity: dict, n_vocab: int):
        cache_dir = Path(cache_dir)
        if cache_dir.exists() and not cache_dir.is_dir():
            raise RowStoreError(f"cache dir {cache_dir} is not a directory")
        own_meta = cache_dir / "meta.json"
        if own_meta.exists():     # pointed at one model's store instead of the directory holding them
            other = _read_meta(own_meta)
            raise RowStoreError(f"{cache_dir} is the row store of {other.get('identity', {}).get('model', '?')} "
                                f"itself; pass the directory above it (stores are kept per model inside it)")
        self.identity, self.n_vocab = identity, n_vocab
        self.row_bytes = 4 * n_vocab
        idh = identity_hash(identity)
        self.root = bytes.fromhex(idh)[:KEY_BYTES]
        self.dir = cache_dir / f"{_slug(identity.get('role', 'rows'))}-{_slug(Path(identity['model']).stem)}-{idh[:16]}"
        meta = {"format": FORMAT, "n_vocab": n_vocab, "dtype": "float32", "identity": identity}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta_path = self.dir / "meta.json"
            if meta_path.exists():
                found = _read_meta(meta_path)
                if found != meta:
                    raise RowStoreError(f"row store {self.dir} was made for another model or build "
                                        f"({_differs(found, meta)}); use another cache dir or delete it")
            else:
                tmp = meta_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
                tmp.replace(meta_path)
            self._lock = open(self.dir / "lock", "a+")
        except OSError as e:
            raise RowStoreError(f"cannot use cache dir {cache_dir}: {e}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.writable = True
        except OSError:
            self.writable = False
            log.warning("row store %s is being written by another process: reading it, adding nothing",
                        self.dir)
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND if self.writable else os.O_RDONLY
        for name in ("rows.f32", "keys.bin"):
            if not self.writable and not (self.dir / name).exists():
                (self.dir / name).touch()
        self._rows = os.open(self.dir / "rows.f32", flags, 0o644)
        self._keys = os.open(self.dir / "keys.bin", flags, 0o644)
        n_rows = os.fstat(self._rows).st_size // self.row_bytes
        raw = os.pread(self._keys, os.fstat(self._keys).st_size, 0)
        n = min(n_rows, len(raw) // KEY_BYTES)
        if self.writable:         # a torn tail (a process killed mid-append): cut back to whole rows with keys
            os.ftruncate(self._rows, n * self.row_bytes)
            os.ftruncate(self._keys, n * KEY_BYTES)
        self._index = {raw[i * KEY_BYTES:(i + 1) * KEY_BYTES]: i for i in range(n)}
        self._n = n
        self.loaded = n            # rows found on disk at open

    def __len__(self) -> int:
        return self._n

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    @property
    def size_bytes(self) -> int:
        return self._n * (self.row_bytes + KEY_BYTES)

    def get(self, key: bytes) -> np.ndarray | None:
        """The row stored under `key` (a fresh, writable (n_vocab,) float32 array), or None."""
        i = self._index.get(key)
        if i is None:
            return None
        out = np.empty(self.n_vocab, np.float32)
        got = os.preadv(self._rows, [memoryview(out).cast("B")], i * self.row_bytes)
        if got != self.row_bytes:
            raise RowStoreError(f"row store {self.dir}: row {i} is short ({got} of {self.row_bytes} bytes)")
        return out

    def put(self, key: bytes, row: np.ndarray) -> None:
        """Keep `row` under `key` (a key already stored keeps its row: a prefix has one row)."""
        if key in self._index:
            return
        row = np.ascontiguousarray(row, np.float32)
        if row.shape != (self.n_vocab,):
            raise ValueError(f"row of shape {row.shape}, store holds ({self.n_vocab},)")
        if self.writable:
            _write_all(self._rows, memoryview(row).cast("B"))      # the row first: a key never names a torn row
            _write_all(self._keys, key)
            self._index[key] = self._n
            self._n += 1

    def close(self) -> None:
        for fd in (self._rows, self._keys):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._lock.close()


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RowStoreError(f"unreadable row store metadata {path}: {e}") from None


def _differs(found: dict, want: dict) -> str:
    a, b = found.get("identity", {}), want["identity"]
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not keys:
        keys = [k for k in ("format", "n_vocab", "dtype") if found.get(k) != want.get(k)]
    return ", ".join(f"{k}: {a.get(k, found.get(k))!r} there, {b.get(k, want.get(k))!r} here" for k in keys[:3])
