"""Shared fixtures: small synthetic data sets made on the fly (no test needs ../shared)."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Callable

import pytest

from pipeline.data.synthetic import make_synthetic

SHARED_JSRT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "jsrt"


def pytest_collection_modifyitems(config, items):
    """Checks on the real data (`real_data`) run where ../shared holds it and are left out, not skipped, where it
    does not (a fresh clone elsewhere, CI): the suite's own tests never need it."""
    if SHARED_JSRT.exists():
        return
    real = [item for item in items if item.get_closest_marker("real_data")]
    if real:
        config.hook.pytest_deselected(items=real)
        items[:] = [item for item in items if not item.get_closest_marker("real_data")]


# Keep torch on few threads: the suite runs on 2 cores and spawns DataLoader workers (make test runs two pytest
# workers with OMP_NUM_THREADS=1 from its environment).
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """The suite runs offline: a connection to anything but this machine fails the test that makes it (a
    backbone or data set fetched from a hub, say); local sockets (loopback, Unix) stay usable."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"a test tried to reach {address[0]}:{address[1]}; the suite must run offline")

    def connect(sock, address):
        guard(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        guard(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


def shared_folder(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """A folder `make(folder)` fills once for the whole run: under pytest-xdist (make test's two processes) the
    first worker makes it under a file lock in the workers' common temporary folder and the others reuse it, so a
    session fixture costs once, not once per worker. What is in it is read-only to the tests."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    from filelock import FileLock

    folder = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def synthetic_master(tmp_path_factory) -> Path:
    """24 synthetic radiographs of 64 px (15 with a nodule); copy before modifying."""
    return shared_folder(tmp_path_factory, "synthetic", lambda folder: make_synthetic(
        folder / "jsrt", n_images=24, image_size=64, seed=3)) / "jsrt"


@pytest.fixture()
def synthetic_dir(synthetic_master, tmp_path) -> Path:
    """A private, modifiable copy of the synthetic data set."""
    dest = tmp_path / "jsrt"
    shutil.copytree(synthetic_master, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_cache(synthetic_master, tmp_path_factory) -> Path:
    """A feature cache of the synthetic set with two tiny random backbones (read-only: copy to modify)."""
    from stages.extract import extract_features
    from tests.helpers import tiny_config

    return shared_folder(tmp_path_factory, "cache", lambda folder: extract_features(
        synthetic_master, folder / "tiny.h5", tiny_config(), progress=False)) / "tiny.h5"


@pytest.fixture(scope="session")
def nodule_cache(tmp_path_factory):
    """60 synthetic radiographs of 128 px with obvious nodules (80%, subtlety 4-5) and a cache holding pooled
    features and spatial maps of a tiny random backbone: (data folder, cache), read-only."""
    from stages.extract import extract_features
    from tests.helpers import TINY, tiny_config

    def make(root: Path) -> None:
        data = make_synthetic(root / "d", n_images=60, image_size=128, seed=5, nodule_fraction=0.8,
                              subtleties=(4, 5))
        spatial = {"extract.spatial.enabled": True, "extract.spatial.image_size": 128, "extract.spatial.stage": -3,
                   "extract.spatial.backbones": [TINY[0]], "extract.image_size": 64}
        extract_features(data, root / "c.h5", tiny_config(**spatial), progress=False)

    root = shared_folder(tmp_path_factory, "nodules", make)
    return root / "d", root / "c.h5"
