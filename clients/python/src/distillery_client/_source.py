"""Which sources an installed client was built from, so a stale install is noticed.

``setup.py`` records :func:`source_digest` of the tree it builds from in ``_proto/_build.py``;
``python -m distillery_client._source --check REPO`` exits 0 iff the installed package was built
from the sources now in ``REPO`` (``.ci/run`` and the end-to-end tests use it). Standard library
only: ``setup.py`` loads this file before anything is installed.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def _files(client_dir: Path, proto_root: Path) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for p in sorted((proto_root / "distillery" / "v1").glob("*.proto")):
        out.append(("proto/" + p.relative_to(proto_root).as_posix(), p))
    for name in ("pyproject.toml", "setup.py"):
        out.append((name, client_dir / name))
    pkg = client_dir / "src" / "distillery_client"
    for p in sorted(pkg.rglob("*.py")):
        rel = p.relative_to(pkg)
        # The generated stubs follow from the protos, which are hashed above.
        if rel.parts[0] == "_proto" or "__pycache__" in rel.parts:
            continue
        out.append(("src/" + rel.as_posix(), p))
    return out


def source_digest(client_dir: Path, proto_root: Path) -> str:
    """sha256 over the client's sources and the protos (names and contents)."""
    h = hashlib.sha256()
    for name, path in _files(client_dir, proto_root):
        h.update(name.encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def installed_digest() -> str | None:
    """The digest recorded when this package was installed, or None without generated stubs."""
    try:
        from distillery_client._proto import _build
    except ImportError:
        return None
    return str(_build.SOURCE_DIGEST)


def staleness(repo: Path) -> str | None:
    """Why the installed client does not match the sources in ``repo``, or None when it does."""
    expected = source_digest(repo / "clients" / "python", repo / "proto")
    got = installed_digest()
    if got is None:
        return "distillery_client is installed without its generated stubs"
    if got != expected:
        return (
            f"the installed distillery_client ({Path(__file__).parent}) was built from other "
            f"sources than {repo}: reinstall it with `pip install {repo / 'clients' / 'python'}`"
        )
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--check":
        print("usage: python -m distillery_client._source --check REPO", file=sys.stderr)
        return 2
    problem = staleness(Path(argv[1]).resolve())
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
