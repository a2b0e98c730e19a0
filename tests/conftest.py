import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    env = os.environ.get("ESOLM_REFERENCE_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "reference"


def reference_files() -> list[Path]:
    return sorted(reference_dir().glob("authors_esolm_*.pt"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
