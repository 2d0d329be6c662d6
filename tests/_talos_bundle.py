"""One talos/build.py build per test session, shared by tests/test_talos.py and
tests/test_deploy_image.py (PyInstaller takes 30-60 s; building twice would double it).

Kept in the session's ``config.stash``, so no module-level state: a session that runs
both files builds once, a session that runs either builds once.

talos/.build is shared by every session on the machine (the venv is the costly part), and
a build rewrites its work tree: two sessions building at once gave an archive whose layer
blob did not match its digest. So a build holds an exclusive lock on talos/.build, and the
staged tree the tests read is copied into the session's own directory before the lock goes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

TALOS = Path(__file__).resolve().parent.parent / "talos"
CACHE = TALOS / ".build"
_BUILT = pytest.StashKey[Any]()
# Another session's build takes 50-110 s here (2 busy cores); a few may queue.
LOCK_TIMEOUT = 600.0


@contextmanager
def _exclusive(cache: Path) -> Iterator[None]:
    """An exclusive flock on ``cache/.lock``, waited for at most LOCK_TIMEOUT."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("a") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{cache} stayed locked by another build for {LOCK_TIMEOUT} s")
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_talos_module(name: str, filename: str) -> ModuleType:
    """A module of talos/ (not a package) from its file, once per process."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TALOS / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def build_module() -> ModuleType:
    # The name talos/container_image.py looks for, so both share one BuildError.
    return load_talos_module("talos_build", "build.py")


def built_once(request: pytest.FixtureRequest, factory: pytest.TempPathFactory) -> Any:
    """talos/build.py's Outputs, built on the first call of the session; fails, not skips."""
    stash = request.config.stash
    if _BUILT in stash:
        return stash[_BUILT]
    if os.geteuid() != 0:
        pytest.fail("the bundle tests need root (chroot, mount namespaces, ctr)")
    module = build_module()
    out = factory.mktemp("talos-out")
    with _exclusive(CACHE):
        try:
            result = module.build(out, CACHE, "/usr/bin/python3")
        except module.BuildError as e:
            pytest.fail(f"talos/build.py failed: {e}")
        # The archive and the binary are in `out` already; the staged tree is the cache's.
        stage = factory.mktemp("talos-stage") / "extension"
        shutil.copytree(result.stage, stage, symlinks=True)
    result = dataclasses.replace(
        result, stage=stage, service_rootfs=stage / result.service_rootfs.relative_to(result.stage)
    )
    print(f"\nbuild: {result.seconds:.1f} s")
    stash[_BUILT] = result
    return result
