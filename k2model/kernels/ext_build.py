"""Building a C++ extension once per source content, with a lock that cannot go stale.

torch's `cpp_extension.load` caches a build by extension name under TORCH_EXTENSIONS_DIR and
guards it with a lock *file*: a process killed mid-build leaves the file behind, and every
later start waits on it forever without a word. Its build files also name the sources by
absolute path, so each checkout at another path rebuilds the shared cache. Here:
- the build folder is named by a hash of what decides the binary (source contents, flags,
  torch and Python versions), and the sources are copied into it, so the build does not depend
  on where the checkout is and a changed source gets a folder of its own;
- builds of one folder are serialised by `flock` on a file inside it, which the kernel releases
  when its holder dies, so a killed build never blocks the next; torch's own lock file, found
  while we hold ours, can only be stale: it is reported and removed;
- a finished build leaves a marker; with it present (the folder's key says the sources are
  the same) the module is imported straight away, with no lock and no ninja run;
- a process that waits for another's build says so, and every build says how long it took.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """torch's extension cache: TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_extensions"


def content_key(sources: Sequence[Path], flags: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for part in (torch.__version__, sys.version, *flags):
        digest.update(part.encode() + b"\0")
    for source in sorted(sources, key=lambda p: p.name):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def folder_for(
    name: str,
    sources: Sequence[Path],
    headers: Sequence[Path],
    cflags: Sequence[str],
    ldflags: Sequence[str],
) -> Path:
    """The build folder of `name` from these sources (headers count toward the key)."""
    key = content_key([*sources, *headers], [*cflags, "|", *ldflags])
    return cache_root() / f"{name}-{key}"


def build(
    name: str,
    sources: Sequence[Path],
    headers: Sequence[Path],
    cflags: Sequence[str],
    ldflags: Sequence[str],
) -> ModuleType:
    """The compiled module `name` of these sources, built into its content-keyed folder
    unless it is there already."""
    folder = folder_for(name, sources, headers, cflags, ldflags)
    done = folder / "built.ok"
    if done.is_file():
        return _import(name, folder / f"{name}.so")
    (folder / "src").mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / "build.lock", name):
        copies = []
        for source in [*sources, *headers]:
            copy = folder / "src" / source.name
            if not copy.is_file() or copy.read_bytes() != source.read_bytes():
                shutil.copyfile(source, copy)
            copies.append(copy)
        stale = folder / "lock"  # torch's FileBaton: nobody else can be building here now
        if stale.exists():
            log.warning("%s: removing a stale build lock left by a killed build", stale)
            stale.unlink()
        from torch.utils.cpp_extension import load

        built = any(folder.glob(f"{name}*.so"))
        started = time.monotonic()
        if not built:
            log.warning("building %s (first use of these sources; about a minute) ...", name)
        module = load(
            name=name,
            sources=[str(c) for c in copies[: len(sources)]],
            extra_cflags=list(cflags),
            extra_ldflags=list(ldflags),
            build_directory=str(folder),
            verbose=False,
        )
        if not built:
            log.warning("built %s in %.0f s (%s)", name, time.monotonic() - started, folder)
        done.write_text(f"{name}.so\n")
        return module


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _exclusive:
    """flock on `path` for the block; says whose build it waits for."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            log.warning("waiting for process %s, which is building %s ...", holder, self.what)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock
