"""Shared fixtures. Images are built once per machine into TT_TEST_IMAGE_PATH (cached across runs:
an unchanged image is not rebuilt) with the build cache in TT_TEST_CACHE_DIR."""

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd.builders.image_recipe import DEFAULT_TARGETS, BuildSpec
from hostd.images.build import Builder, build_image
from hostd.images.catalogue import Image
from tests.pgcluster import PgCluster, pg_cluster
from ttci.infra.log import setup_logging
from ttci.model.naming import parse_arch, parse_release

IMAGE_PATH = Path(os.environ.get("TT_TEST_IMAGE_PATH", "/var/lib/ttci/images"))
CACHE_DIR = Path(os.environ.get("TT_TEST_CACHE_DIR", "/var/cache/ttci"))


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    setup_logging()


@pytest.fixture(scope="session", autouse=True)
def _interruptible() -> None:
    """A suite started in the background of a non-interactive shell (`make test &`) inherits
    SIGINT ignored (POSIX), and so would every `tt` it starts: the tests that press Ctrl-C on
    `tt job run` need Python's own SIGINT handler here, so their children start with SIGINT
    at its default (a handler is reset on exec; an ignored signal stays ignored)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def built_image(release: str, arch: str, profile: str = "agent") -> Image:
    spec = BuildSpec(parse_release(release), parse_arch(arch), profile=profile)
    manifest, _ = build_image(spec, IMAGE_PATH, CACHE_DIR)
    return Image(manifest, IMAGE_PATH / spec.name.dirname)


@pytest.fixture(scope="session")
def amd64_image() -> Iterator[Image]:
    yield built_image("debian-12", "amd64")


@pytest.fixture(scope="session")
def default_images() -> dict[str, Image]:
    """The nine default images, built two at a time (one per core) on a fresh machine."""
    specs = [BuildSpec(parse_release(r), a) for r, a in DEFAULT_TARGETS]
    results = Builder(IMAGE_PATH, CACHE_DIR).build_many(specs, jobs=os.cpu_count() or 1)
    return {m.name: Image(m, IMAGE_PATH / m.image_name.dirname) for m, _ in results}


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    """A throw-away PostgreSQL cluster (tests/pgcluster.py), started on first use."""
    with pg_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg: PgCluster) -> Iterator[str]:
    """A fresh, empty database of the session's cluster for this test."""
    with pg.database() as url:
        yield url


@pytest.fixture(params=["sqlite", "pg"])
def database(request: pytest.FixtureRequest) -> str:
    """The scheduler's (or the GitHub service's) --database: "" (SQLite in its state directory,
    the default) or a fresh PostgreSQL database. Fixtures that make the services take it, so
    their tests run against both backends (ids [sqlite] and [pg]; `-k sqlite` runs one)."""
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("pg_url"))
