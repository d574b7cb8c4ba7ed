"""The checked-in gRPC stubs are exactly what the .proto files generate."""
import os
import pathlib

from protos.generate import PROTOS, generate

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_checked_in_stubs_match_the_protos(tmp_path):
    (tmp_path / "protos").mkdir()
    generate(str(tmp_path), str(ROOT))
    produced = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert produced, "protoc produced nothing"
    stems = {pathlib.Path(p).stem for p in PROTOS}
    assert {p.name.split("_pb2")[0] for p in produced} == stems
    for rel in produced:
        checked_in = ROOT / rel
        assert checked_in.exists(), f"{rel} is generated but not checked in: run python -m protos.generate"
        assert checked_in.read_text() == (tmp_path / rel).read_text(), \
            f"{rel} is stale: run python -m protos.generate"


def test_every_checked_in_stub_comes_from_a_proto():
    stems = {pathlib.Path(p).stem for p in PROTOS}
    for path in (ROOT / "protos").iterdir():
        if "_pb2" in path.name:
            assert path.name.split("_pb2")[0] in stems, f"{path.name} has no .proto: delete it"
    assert os.path.exists(ROOT / "protos" / "pdcluster_pb2_grpc.py")
