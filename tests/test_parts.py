"""A GGUF split over part packages: assembled in order, checked by its hash, never left half-written."""

from __future__ import annotations

import hashlib
import importlib

import pytest

from emoscope.errors import EmoscopeError
from emoscope.models import QWEN_05B, QWEN_15B, REGISTRY
from emoscope.parts import SplitGGUF


def _packages(root, prefix: str, chunks: list[bytes]) -> None:
    for i, blob in enumerate(chunks, 1):
        data = root / f"{prefix}{i}".replace("-", "_") / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("raise RuntimeError('a part package is never imported')\n")
        (data / f"part{i:02d}.bin").write_bytes(blob)
    importlib.invalidate_caches()


@pytest.fixture
def split(tmp_path, monkeypatch):
    """Three fake part packages on sys.path and the SplitGGUF they assemble into (cache under tmp_path)."""
    chunks = [b"GGUF" + bytes(range(200)) * 50, bytes(range(256)) * 40, b"tail" * 77]
    whole = b"".join(chunks)
    prefix = f"fake-{tmp_path.name[-12:].replace('-', '')}-part"  # unique per test: no stale import caches
    _packages(tmp_path / "site", prefix, chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("EMOSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = SplitGGUF("fake.gguf", prefix, 3, len(whole), hashlib.sha256(whole).hexdigest(), "nobody/fake", "fake")
    return spec, whole, tmp_path


def test_parts_assemble_into_the_published_bytes_once(split):
    spec, whole, root = split
    path = spec.path()
    assert path == root / "cache" / "gguf" / "fake.gguf" and path.read_bytes() == whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.verified"]
    for f in spec.part_files()[0]:  # verified once: a second call needs neither the parts nor a rehash
        f.unlink()
    assert spec.path() == path


def test_a_missing_part_names_the_package_and_the_install(split):
    spec, _, root = split
    (spec.part_files()[0][1]).unlink()
    with pytest.raises(EmoscopeError, match=rf"needs part package {spec.package}2: pip install 'emoscope\[fake\]'"):
        spec.path()
    assert not (root / "cache" / "gguf").exists() or not any((root / "cache" / "gguf").iterdir())


def test_a_corrupt_part_leaves_nothing_behind(split):
    spec, _, root = split
    part = spec.part_files()[0][2]
    part.write_bytes(b"tail" * 76 + b"TAIL")  # same size, other bytes
    with pytest.raises(EmoscopeError, match="is corrupt or of another release; reinstall with --force-reinstall"):
        spec.path()
    assert list((root / "cache" / "gguf").iterdir()) == []
    part.write_bytes(b"tail" * 70)  # short: the size alone tells
    with pytest.raises(EmoscopeError, match="assemble into"):
        spec.path()
    assert list((root / "cache" / "gguf").iterdir()) == []


def test_a_cached_file_changed_after_verification_is_rebuilt(split):
    spec, whole, _ = split
    path = spec.path()
    path.write_bytes(b"GGUF" + b"\0" * (len(whole) - 4))  # corrupted in place, same size
    assert spec.path().read_bytes() == whole


def test_an_unverified_file_in_the_cache_is_hashed_first(split):
    spec, whole, root = split
    target = root / "cache" / "gguf" / "fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(whole)  # e.g. copied in by hand: accepted after its hash is checked
    for f in spec.part_files()[0]:
        f.unlink()
    assert spec.path() == target and (target.parent / "fake.gguf.verified").exists()


def test_qwen_models_are_registered_with_their_published_hashes():
    assert REGISTRY["qwen2.5-coder-1.5b-instruct"].gguf == QWEN_15B.path and QWEN_15B.parts == 22
    assert REGISTRY["qwen2.5-coder-0.5b-instruct"].gguf == QWEN_05B.path and QWEN_05B.parts == 6
    assert QWEN_15B.sha256.startswith("cc324af0") and QWEN_05B.sha256.startswith("1d961463")
    assert REGISTRY["qwen2.5-coder-1.5b-instruct"].chat and REGISTRY["qwen2.5-coder-0.5b-instruct"].chat
