"""The CPU extension's build is keyed by source content and guarded by a lock that dies with its
holder (k2model/kernels/ext_build.py).

Regression: torch's lock *file* outlived a build killed midway, and every
later start waited on it forever with no message (a fresh clone's CI failed 14 tests this way);
and each checkout at another path rebuilt the shared extension cache."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from k2model.kernels import cpu_ext, ext_build

needs_ext = pytest.mark.skipif(
    not cpu_ext.available(), reason="no AVX2 CPU or C++ compiler for the CPU extension"
)
CSRC = Path(cpu_ext.__file__).with_name("csrc")


def folder() -> Path:
    return ext_build.folder_for(*cpu_ext.build_args())


def hold_the_build_lock() -> subprocess.Popen:
    """Another process that holds the build lock (as a build would) until it is killed."""
    hold = (
        "import time\nfrom pathlib import Path\nfrom k2model.kernels.ext_build import _exclusive\n"
        f"with _exclusive(Path({str(folder() / 'build.lock')!r}), 'x'):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_the_key_is_the_content_not_the_path(tmp_path: Path) -> None:
    copies = []
    for source in sorted(CSRC.iterdir()):
        shutil.copyfile(source, tmp_path / source.name)
        copies.append(tmp_path / source.name)
    originals = sorted(CSRC.iterdir())
    assert ext_build.content_key(copies, ["-O3"]) == ext_build.content_key(originals, ["-O3"])
    (tmp_path / "rms_norm.cpp").write_text("// changed\n" + (CSRC / "rms_norm.cpp").read_text())
    assert ext_build.content_key(copies, ["-O3"]) != ext_build.content_key(originals, ["-O3"])


@needs_ext
def test_a_stale_torch_lock_file_is_removed_not_waited_on() -> None:
    stale = folder() / "lock"
    stale.write_text("")  # what a build killed midway leaves behind: torch's lock file,
    (folder() / "built.ok").unlink(missing_ok=True)  # and no marker of a finished build
    code = "from k2model.kernels import cpu_ext; assert cpu_ext.available()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    assert not stale.exists()


@needs_ext
def test_a_build_lock_holder_that_is_killed_does_not_block() -> None:
    holder = hold_the_build_lock()
    try:
        holder.kill()  # a build killed while holding the lock
        holder.wait()
        (folder() / "built.ok").unlink(missing_ok=True)  # so the next start takes the lock
        started = time.monotonic()
        code = "from k2model.kernels import cpu_ext; assert cpu_ext.available()"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
        assert time.monotonic() - started < 300
    finally:
        holder.kill()
        holder.wait()


@needs_ext
def test_a_finished_build_is_imported_without_waiting_for_the_lock() -> None:
    """With the marker of a finished build, nothing is built or checked: a process holding the
    build lock (a build of another process) does not delay the import."""
    cpu_ext.available()  # built, marker written
    holder = hold_the_build_lock()
    try:
        code = "from k2model.kernels import cpu_ext; assert cpu_ext.available()"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()


@needs_ext
def test_a_second_checkout_reuses_the_build(tmp_path: Path) -> None:
    """Sources at another path (a second clone) map to the same folder: nothing is rebuilt."""
    so = sorted(folder().glob("k2_cpu_ops*.so"))
    assert so, "the extension is built in its content-keyed folder"
    before = so[0].stat().st_mtime_ns
    for source in CSRC.iterdir():
        shutil.copyfile(source, tmp_path / source.name)
    name, _, _, cflags, ldflags = cpu_ext.build_args()
    sources = [tmp_path / s for s in cpu_ext.SOURCES]
    ext_build.build(name, sources, sorted(tmp_path.glob("*.h")), cflags, ldflags)
    assert so[0].stat().st_mtime_ns == before
