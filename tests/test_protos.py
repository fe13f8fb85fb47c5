"""The committed gRPC code is exactly what scripts/gen_protos.py generates from protos/ now."""
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
FIX = "run `python scripts/gen_protos.py` and commit its output"


def _gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_up_to_date(tmp_path):
    gen_protos = _gen_protos()
    regenerated = {path.relative_to(tmp_path) for path in gen_protos.generate(tmp_path)}
    committed = {path.relative_to(REPO) for rel_dir in gen_protos.TARGETS for path in (REPO / rel_dir).glob("*.py")}

    assert regenerated, "scripts/gen_protos.py generated nothing"
    missing = sorted(str(p) for p in regenerated - committed)
    assert not missing, f"generated files not in the checkout: {missing}; {FIX}"
    stale = sorted(str(p) for p in regenerated if (tmp_path / p).read_bytes() != (REPO / p).read_bytes())
    assert not stale, f"generated files differ from protos/: {stale}; {FIX}"
    leftover = sorted(str(p) for p in committed - regenerated)
    assert not leftover, f"files no proto generates any more: {leftover}; {FIX}"
