"""Pytest fixtures for the NAT lab (deploy/lab/netlab.py): real Linux NAT in network namespaces.

Loaded from tests/conftest.py with `pytest_plugins = ["tests.labfixtures"]` (or `-p
tests.labfixtures`). This module owns making labs for tests and tearing them down whatever the
test did; what a lab is and its address plan are netlab's docstring.

    @pytest.mark.lab
    def test_something(lab_factory: LabFactory) -> None:
        lab = lab_factory(offices=2, symmetric=[2], hosts=["rh"])
        lab.office(1).host("rh").popen([...])

Not root: the test is skipped, saying so. Root but the lab cannot be built (a tool missing, the
kernel refusing): the test fails with netlab's message; a broken lab is never hidden as a skip.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest

LAB_DIR = Path(__file__).resolve().parents[1] / "deploy" / "lab"
if str(LAB_DIR) not in sys.path:
    sys.path.insert(0, str(LAB_DIR))

import netlab  # noqa: E402  (after the sys.path entry above)

__all__ = ["LAB_DIR", "LabFactory", "lab_factory", "netlab", "require_lab"]

_stale_cleaned = False


class LabFactory(Protocol):
    """Builds a `netlab.Lab` (same arguments); the fixture destroys it at teardown."""

    def __call__(
        self,
        offices: int = 1,
        *,
        symmetric: Collection[int] = (),
        different_subnets: bool = False,
        hosts: Sequence[str] = (),
    ) -> netlab.Lab: ...


def require_lab() -> None:
    """Skip unless root; fail (not skip) when root but the lab's tools are missing."""
    global _stale_cleaned
    try:
        netlab.check_requirements()
    except netlab.NotRootError as exc:
        pytest.skip(str(exc))
    except netlab.LabError as exc:
        pytest.fail(f"NAT lab cannot run on this machine: {exc}", pytrace=False)
    if not _stale_cleaned:
        # Labs of earlier runs killed with SIGKILL (no atexit) would otherwise pile up.
        _stale_cleaned = True
        netlab.cleanup_stale()


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest) -> Iterator[LabFactory]:
    """Make labs for one test; every one is destroyed at teardown, even if the test raised."""
    if request.node.get_closest_marker("lab") is None:
        pytest.fail("a test using lab_factory must be marked @pytest.mark.lab", pytrace=False)
    require_lab()
    labs: list[netlab.Lab] = []

    def make(
        offices: int = 1,
        *,
        symmetric: Collection[int] = (),
        different_subnets: bool = False,
        hosts: Sequence[str] = (),
    ) -> netlab.Lab:
        lab = netlab.Lab(
            offices, symmetric=symmetric, different_subnets=different_subnets, hosts=hosts
        )
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        failures = []
        for lab in labs:
            try:
                lab.destroy()
            except netlab.LabError as exc:
                failures.append(f"lab {lab.id}: {exc}")
        if failures:
            pytest.fail("NAT lab teardown failed: " + "; ".join(failures), pytrace=False)
