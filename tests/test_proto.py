"""The committed generated code is exactly what protoc makes from tandem.proto."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path):
    (tmp_path / "proto").mkdir()
    shutil.copy(ROOT / "proto" / "tandem.proto", tmp_path / "proto" / "tandem.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", "proto/tandem.proto"], cwd=tmp_path, check=True)
    for name in ("tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py"):
        fresh = (tmp_path / "proto" / name).read_text()
        committed = (ROOT / "proto" / name).read_text()
        assert fresh == committed, f"proto/{name} is stale: run `make proto` and commit"
