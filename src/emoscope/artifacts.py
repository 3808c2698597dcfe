"""Files on disk: folders written atomically, JSON, and the stable hash of configs.

A result folder is written into a temporary sibling and renamed into place at the end, so an
interrupted run never leaves a half-written folder that could be read as complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel


def cache_root() -> Path:
    """Where emoscope keeps what it derives from model files ($EMOSCOPE_CACHE, default ~/.cache/emoscope)."""
    return Path(os.environ.get("EMOSCOPE_CACHE", Path.home() / ".cache" / "emoscope"))


LARGE = 64 << 20
"""Bytes from which a file's hash is memoized (`file_sha256`)."""


def file_sha256(path: Path) -> str:
    """The file's SHA-256. A large file's is read once per process while its path, inode, size and modification
    time stay the same (layer sensitivity names a dozen builds by a 7 GB source's hash; a small file, which a test
    may rewrite within one tick of the file-system clock, is read every time)."""
    st = os.stat(path)
    if st.st_size < LARGE:
        return _sha256.__wrapped__(str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    return _sha256(str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def config_hash(*parts) -> str:
    """Stable hash of configs (pydantic models or plain JSON-able values)."""
    blobs = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    return hashlib.sha256(json.dumps(blobs, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary sibling folder; on success it replaces `final` in one rename. Leftovers of a
    killed writer (SIGKILL skips the cleanup below) are never read, and are removed here."""
    from .errors import EmoscopeError

    final = Path(final).expanduser()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in [*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    except OSError as e:  # a parent that is a file, a read-only folder
        raise EmoscopeError(f"cannot write {final}: {e.strerror or e}") from None
    try:
        yield tmp
    except OSError as e:  # a full disk, a quota: nothing half-written is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise EmoscopeError(f"cannot write {final}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists() and not final.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise EmoscopeError(f"cannot write {final}: it exists and is a file")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def reading(what):
    """Errors while reading saved results become one line: the files are corrupt or not emoscope's."""
    from .errors import EmoscopeError
    try:
        yield
    except EmoscopeError:
        raise
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        raise EmoscopeError(f"{what} holds results emoscope cannot read ({why}); "
                            "rerun the stage that wrote them") from None


def read_json(path: Path):
    """A JSON file written by emoscope; a corrupt one is reported as such, in one line."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        from .errors import EmoscopeError
        raise EmoscopeError(f"{path} is corrupt (not JSON: {getattr(e, 'msg', None) or e.reason}); rerun the stage "
                            "that wrote it") from None
