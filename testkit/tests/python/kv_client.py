"""A client in another language: Python stubs generated from proto/ talk to the proxy.

Usage: kv_client.py --proto-dir proto --endpoint 127.0.0.1:PORT --token JWT
Prints PYTHON-CLIENT-OK on success; exits non-zero on any failure.
"""
import argparse
import importlib
import pathlib
import sys
import tempfile

from grpc_tools import protoc


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--token", required=True)
    args = ap.parse_args()

    out = tempfile.mkdtemp(prefix="skv-py-")
    rc = protoc.main(["grpc_tools.protoc", f"-I{args.proto_dir}", f"--python_out={out}",
                      f"--grpc_python_out={out}", "skv/v1/kv.proto"])
    if rc != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for d in ["skv", "skv/v1"]:
        (pathlib.Path(out) / d / "__init__.py").touch()
    sys.path.insert(0, out)
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    kv_pb2 = importlib.import_module("skv.v1.kv_pb2")
    kv_pb2_grpc = importlib.import_module("skv.v1.kv_pb2_grpc")

    channel = grpc.insecure_channel(args.endpoint)
    md = [("authorization", f"Bearer {args.token}")]
    kv = kv_pb2_grpc.KvStub(channel)

    put = kv.Put(kv_pb2.PutRequest(key=b"py-key", value=b"from python"), metadata=md, timeout=10)
    assert put.version >= 1, put
    got = kv.Get(kv_pb2.GetRequest(key=b"py-key"), metadata=md, timeout=10)
    assert got.found and got.value == b"from python", got
    cas = kv.CompareAndSwap(kv_pb2.CompareAndSwapRequest(key=b"py-key", expected_version=put.version,
                                                         value=b"swapped"), metadata=md, timeout=10)
    assert cas.succeeded and cas.version == put.version + 1, cas
    keys = [kv_.key for page in kv.Scan(kv_pb2.ScanRequest(start=b"py", end=b"pz"), metadata=md, timeout=10)
            for kv_ in page.kvs]
    assert keys == [b"py-key"], keys

    try:
        kv.Get(kv_pb2.GetRequest(key=b"py-key"), timeout=10)
        print("a call without a token was accepted", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e.code()

    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="skv.v1.Kv"), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING, status
    print("PYTHON-CLIENT-OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
