"""An OTLP trace receiver for tests/tests/tracing.rs: OTLP/HTTP on one port and OTLP/gRPC
(a real gRPC server, Debian's python3-grpcio) on another. No collector runs on this machine,
so this one answers as a collector does and prints each export request as one JSON line:

  {"via": "http" | "grpc", "path": ..., "content_type": ..., "peer": ..., "authorization": ...,
   "body": "<hex of the protobuf>"}

The test decodes the body with the OTLP protobuf types (opentelemetry-proto).

  collector.py HTTP_PORT GRPC_PORT [quiet] [tls CERT KEY [CLIENT_CA]]

With "quiet" it prints only a count of the bytes received, at exit (tests/bench/tracing-cost).
With "tls" both ports serve TLS only, with the certificate chain CERT and its key KEY; with
CLIENT_CA they also require a client certificate that chains to it, and "peer" is its common
name ("" without one).
"""
import json
import ssl
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

lock = threading.Lock()
QUIET = False
received = {"exports": 0, "bytes": 0}


def report(via, path, content_type, body, peer="", authorization=""):
    if QUIET:
        with lock:
            received["exports"] += 1
            received["bytes"] += len(body)
        return
    line = json.dumps({"via": via, "path": path, "content_type": content_type, "peer": peer,
                       "authorization": authorization, "body": body.hex()})
    with lock:
        print(line, flush=True)


class Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        cert = getattr(self.connection, "getpeercert", lambda: None)() or {}
        peer = dict(n[0] for n in cert.get("subject", ())).get("commonName", "")
        report("http", self.path, self.headers.get("content-type", ""), body, peer,
               self.headers.get("authorization", ""))
        # An empty ExportTraceServiceResponse: full success.
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def export(request, context):
    names = context.auth_context().get("x509_common_name", [b""])
    metadata = dict(context.invocation_metadata())
    report("grpc", "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
           "application/grpc", request, names[0].decode(), metadata.get("authorization", ""))
    return b""


def identity(b):
    return b


def main(http_port, grpc_port, tls):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export, identity, identity)},
    )
    server.add_generic_rpc_handlers((handler,))
    http = ThreadingHTTPServer(("127.0.0.1", http_port), Http)
    if tls:
        cert, key, client_ca = (tls + [None])[:3]
        read = lambda path: open(path, "rb").read()
        credentials = grpc.ssl_server_credentials(
            [(read(key), read(cert))],
            root_certificates=client_ca and read(client_ca),
            require_client_auth=bool(client_ca),
        )
        server.add_secure_port(f"127.0.0.1:{grpc_port}", credentials)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        if client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(client_ca)
        # A failed handshake is an OSError from accept, which the server drops.
        http.socket = context.wrap_socket(http.socket, server_side=True)
    else:
        server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    server.start()
    http.serve_forever()


if __name__ == "__main__":
    args = sys.argv[3:]
    QUIET = "quiet" in args
    tls = args[args.index("tls") + 1:] if "tls" in args else None
    try:
        main(int(sys.argv[1]), int(sys.argv[2]), tls)
    except KeyboardInterrupt:
        print(json.dumps(received), flush=True)
