"""The committed gRPC code is exactly what scripts/gen_protos.py generates from protos/ now."""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
FIX = "run `python scripts/gen_protos.py` and commit its output"


def test_generated_code_is_up_to_date(tmp_path):
    # The script (protoc) runs in a process of its own: grpc_tools crashes on import into a process
    # that has loaded NIXL's bundled protobuf/abseil (tests of the nixl transport do, before this one).
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--root", str(tmp_path)],
                         check=True, capture_output=True, text=True, timeout=120)
    regenerated = {Path(line) for line in out.stdout.split()}                 # it prints what it wrote
    committed = {path.relative_to(REPO) for rel_dir in {p.parent for p in regenerated}
                 for path in (REPO / rel_dir).glob("*.py")}

    assert regenerated, "scripts/gen_protos.py generated nothing"
    missing = sorted(str(p) for p in regenerated - committed)
    assert not missing, f"generated files not in the checkout: {missing}; {FIX}"
    stale = sorted(str(p) for p in regenerated if (tmp_path / p).read_bytes() != (REPO / p).read_bytes())
    assert not stale, f"generated files differ from protos/: {stale}; {FIX}"
    leftover = sorted(str(p) for p in committed - regenerated)
    assert not leftover, f"files no proto generates any more: {leftover}; {FIX}"
