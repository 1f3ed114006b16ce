"""Build hook: generate the gRPC stubs from proto/distillery/v1/*.proto at install time.

The metadata lives in pyproject.toml; this file only adds the generation step to ``build_py`` (so
``pip install clients/python`` runs it) and puts a copy of the protos into source
distributions, which leave the repository behind. Nothing generated is committed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTOS = ("spec", "campaign", "worker")


def proto_root() -> Path:
    """The folder holding ``distillery/v1/*.proto``: $DISTILLERY_PROTO_ROOT, an sdist's copy, or
    the repository's ``proto/``."""
    candidates = [HERE / "proto", HERE.parent.parent / "proto"]
    if os.environ.get("DISTILLERY_PROTO_ROOT"):
        candidates.insert(0, Path(os.environ["DISTILLERY_PROTO_ROOT"]))
    for c in candidates:
        if all((c / "distillery" / "v1" / f"{p}.proto").is_file() for p in PROTOS):
            return c
    raise SystemExit(
        "distillery_client: cannot find distillery/v1/*.proto (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); install from the repository (pip install clients/python) or set DISTILLERY_PROTO_ROOT"
    )


def load_source_module():  # type: ignore[no-untyped-def]
    path = HERE / "src" / "distillery_client" / "_source.py"
    spec = importlib.util.spec_from_file_location("_distillery_source", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# protoc names imports after the proto path (`from distillery.v1 import spec_pb2`); the stubs live
# in `distillery_client._proto`, so those become relative imports.
IMPORT = re.compile(r"^from distillery\.v1 import (\w+_pb2) as ", re.MULTILINE)
MODULE = re.compile(r"'distillery\.v1\.(\w+_pb2)'")


def generate(dest: Path) -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml)

    root = proto_root()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        well_known = Path(protoc.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
        ] + [str(root / "distillery" / "v1" / f"{p}.proto") for p in PROTOS]
        if protoc.main(args) != 0:
            raise SystemExit(f"distillery_client: protoc failed on the protos in {root}")
        out = Path(tmp) / "distillery" / "v1"
        for f in sorted(out.iterdir()):
            text = IMPORT.sub(r"from . import \1 as ", f.read_text())
            text = MODULE.sub(r"'distillery_client._proto.\1'", text)
            if "distillery.v1 import" in text:
                raise SystemExit(f"distillery_client: unexpected import left in generated {f.name}")
            (dest / f.name).write_text(text)
    digest = load_source_module().source_digest(HERE, root)
    (dest / "_build.py").write_text(
        '"""Written by setup.py: the sources these stubs were generated from."""\n\n'
        f'SOURCE_DIGEST = "{digest}"\n'
    )


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        editable = getattr(self, "editable_mode", False)
        built = Path(self.build_lib) / "distillery_client"
        if not editable:
            # pip builds in place: a module removed from src/ must not survive in build/.
            shutil.rmtree(built, ignore_errors=True)
        super().run()
        generate(HERE / "src" / "distillery_client" / "_proto" if editable else built / "_proto")


class SdistWithProtos(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        src = proto_root() / "distillery" / "v1"
        dst = Path(base_dir) / "proto" / "distillery" / "v1"
        dst.mkdir(parents=True, exist_ok=True)
        for p in PROTOS:
            shutil.copy2(src / f"{p}.proto", dst / f"{p}.proto")


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProtos})
