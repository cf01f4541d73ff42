"""The committed generated proto modules match what scripts/gen_protos.py produces now."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]


def test_generated_protos_are_current(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", _ROOT / "scripts/gen_protos.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = gen
    spec.loader.exec_module(gen)
    files = gen.generate(tmp_path)
    assert files
    stale = []
    for path in files:
        committed = _ROOT / "src" / path.relative_to(tmp_path)
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(committed.relative_to(_ROOT)))
    assert not stale, f"regenerate with: python scripts/gen_protos.py  (stale: {stale})"


def test_generated_modules_import() -> None:
    from exo_tools.proto import node_pb2, node_pb2_grpc

    assert hasattr(node_pb2_grpc, "MembershipStub") and hasattr(node_pb2_grpc, "WorkerStub")
    t = node_pb2.Tensor(data=b"\x00" * 8, dtype="bfloat16", shape=[2, 2])
    assert node_pb2.Tensor.FromString(t.SerializeToString()).shape == [2, 2]
