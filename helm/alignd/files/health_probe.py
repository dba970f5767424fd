"""gRPC health check for the exec probes of the alignd chart.

The kubelet's own gRPC probe speaks plaintext only, so over TLS the chart runs this script
instead (``python3 health_probe.py SERVICE PORT SERVER_NAME TLS_DIR MUTUAL``). It also passes
on trainer nodes other than node 0 (``ALIGND_NODE_RANK`` > 0): they run worker ranks and serve
no gRPC. Exit status 0 means the service reports SERVING.

Arguments: the service name health is asked for (``alignd.v1.RewardService``), the gRPC port,
the name the server certificate is checked against, the directory of ``tls.crt``, ``tls.key``
and ``ca.crt`` (empty: plaintext), and ``mutual`` to present ``tls.crt`` as client certificate.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def read(directory: str, name: str) -> bytes | None:
    """The file's bytes, or None when it does not exist (ca.crt of a public CA)."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def channel(port: str, server_name: str, tls_dir: str, mutual: bool) -> grpc.Channel:
    """A channel to the local server, over TLS when ``tls_dir`` is given."""
    target = f"127.0.0.1:{port}"
    if not tls_dir:
        return grpc.insecure_channel(target)
    key = read(tls_dir, "tls.key") if mutual else None
    chain = read(tls_dir, "tls.crt") if mutual else None
    credentials = grpc.ssl_channel_credentials(read(tls_dir, "ca.crt"), key, chain)
    options = [("grpc.ssl_target_name_override", server_name)]
    return grpc.secure_channel(target, credentials, options=options)


def main(argv: list[str]) -> int:
    service, port, server_name, tls_dir, mutual = argv
    if os.environ.get("ALIGND_NODE_RANK", "0") != "0":
        return 0
    with channel(port, server_name, tls_dir, mutual == "mutual") as ch:
        request = health_pb2.HealthCheckRequest(service=service)
        reply = health_pb2_grpc.HealthStub(ch).Check(request, timeout=4)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
