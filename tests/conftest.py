"""Shared test fixtures: goldens, spec builders and table-state builders.

Unmarked tests are unit tests; `slow` touches Lance on disk or runs a tiny model; `gpu` needs CUDA.
`pytest --update-goldens` (or UPDATE_GOLDENS=1) rewrites golden files instead of comparing.
"""

from __future__ import annotations

import os

import pytest

from helpers import check_golden


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", help="Rewrite golden files.")


def pytest_configure(config):
    if config.getoption("--update-goldens"):
        os.environ["UPDATE_GOLDENS"] = "1"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (CI machines have none; run on the device)"))


@pytest.fixture
def golden():
    return check_golden
