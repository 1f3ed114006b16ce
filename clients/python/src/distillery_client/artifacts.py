"""The artifact transfer format, as ``proto/src/artifact.rs`` defines it.

Artifacts are content-addressed: a sha256 digest names each one and is checked after every
download. A model directory travels as a *manifest* blob (JSON ``{"distillery_dir": 1, "files":
[{"path", "digest", "size"}]}``) whose files are artifacts of their own; a manifest's paths are
refused unless they are plain relative paths, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import ArtifactError

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def parse_digest(s: str) -> str:
    """The 64 lowercase hex characters of a digest, given with or without ``sha256:``."""
    hex_ = s.removeprefix("sha256:")
    if not _HEX64.fullmatch(hex_):
        raise ArtifactError(
            f'{s!r} is not a sha256 digest: expect 64 hex characters, optionally after "sha256:"'
        )
    return hex_.lower()


def is_digest(s: str) -> bool:
    try:
        parse_digest(s)
        return True
    except ArtifactError:
        return False


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a directory artifact."""

    path: str
    digest: str
    size: int


def parse_manifest(blob: bytes) -> list[ManifestEntry] | None:
    """The files of a directory manifest, or None when ``blob`` is not one (a plain file)."""
    try:
        doc = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("distillery_dir") != 1:
        return None
    files = doc.get("files")
    if not isinstance(files, list):
        return None
    out = []
    for f in files:
        if not (
            isinstance(f, dict)
            and isinstance(f.get("path"), str)
            and isinstance(f.get("digest"), str)
            and isinstance(f.get("size"), int)
            and f["size"] >= 0
        ):
            return None
        out.append(ManifestEntry(f["path"], f["digest"], f["size"]))
    return out


def safe_join(root: Path, rel: str) -> Path:
    """``root / rel``, refusing anything but a plain relative path (no absolute paths, ``..``,
    ``.``, empty segments, backslashes or NULs), so a manifest cannot write outside ``root``."""
    parts = rel.split("/")
    if (
        not rel
        or "\\" in rel
        or "\0" in rel
        or any(p in ("", ".", "..") for p in parts)
        or Path(rel).is_absolute()
        or Path(rel).drive
    ):
        raise ArtifactError(f"manifest path {rel!r} is not a plain relative path")
    return root.joinpath(*parts)


class ChunkLike(Protocol):
    """A ``Chunk`` message: bytes, and the digest the last one of a download carries."""

    data: bytes
    digest: str


def receive_to_file(chunks: Iterable[ChunkLike], dest: Path, expected: str) -> tuple[str, int]:
    """Writes a stream of ``Chunk`` messages to ``dest`` through a temporary file renamed at the
    end, checking the sha256 against ``expected`` and against any digest a chunk carries.
    Returns (digest, size); on a mismatch or error nothing is left at ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    h = hashlib.sha256()
    size = 0
    announced = parse_digest(expected)
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                if chunk.digest:
                    announced = parse_digest(chunk.digest)
                h.update(chunk.data)
                size += len(chunk.data)
                f.write(chunk.data)
            f.flush()
            os.fsync(f.fileno())
        actual = h.hexdigest()
        for want in {parse_digest(expected), announced}:
            if want != actual:
                raise ArtifactError(
                    f"digest mismatch: expected {want}, received data hashes to {actual}"
                )
        os.replace(tmp, dest)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return actual, size
