"""Generates the Python gRPC stubs for imgate from proto/imgate/v1/gateway.proto (with
grpcio-tools) into a cache folder and imports them. Your own service would run protoc once
in its build instead:

    python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. proto/imgate/v1/gateway.proto
"""
import os
import sys
import tempfile

from grpc_tools import protoc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(tempfile.gettempdir(), "imgate-python-stubs")

os.makedirs(OUT, exist_ok=True)
code = protoc.main([
    "grpc_tools.protoc",
    "-I", os.path.join(ROOT, "proto"),
    "--python_out=" + OUT,
    "--grpc_python_out=" + OUT,
    os.path.join(ROOT, "proto", "imgate", "v1", "gateway.proto"),
])
if code != 0:
    sys.exit("protoc failed")
sys.path.insert(0, OUT)

from imgate.v1 import gateway_pb2 as pb  # noqa: E402
from imgate.v1 import gateway_pb2_grpc as rpc  # noqa: E402

__all__ = ["pb", "rpc"]
