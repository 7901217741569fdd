"""An OTLP trace receiver for tests/tests/tracing.rs: OTLP/HTTP on one port and OTLP/gRPC
(a real gRPC server, Debian's python3-grpcio) on another. No collector runs on this machine,
so this one answers as a collector does and prints each export request as one JSON line:

  {"via": "http" | "grpc", "path": ..., "content_type": ..., "body": "<hex of the protobuf>"}

The test decodes the body with the OTLP protobuf types (opentelemetry-proto).

  collector.py HTTP_PORT GRPC_PORT [quiet]

With "quiet" it prints only a count of the bytes received, at exit (tests/bench/tracing-cost).
"""
import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

lock = threading.Lock()
QUIET = False
received = {"exports": 0, "bytes": 0}


def report(via, path, content_type, body):
    if QUIET:
        with lock:
            received["exports"] += 1
            received["bytes"] += len(body)
        return
    line = json.dumps({"via": via, "path": path, "content_type": content_type, "body": body.hex()})
    with lock:
        print(line, flush=True)


class Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        report("http", self.path, self.headers.get("content-type", ""), body)
        # An empty ExportTraceServiceResponse: full success.
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def export(request, context):
    report("grpc", "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
           "application/grpc", request)
    return b""


def identity(b):
    return b


def main(http_port, grpc_port):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export, identity, identity)},
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    server.start()
    ThreadingHTTPServer(("127.0.0.1", http_port), Http).serve_forever()


if __name__ == "__main__":
    QUIET = sys.argv[3:] == ["quiet"]
    try:
        main(int(sys.argv[1]), int(sys.argv[2]))
    except KeyboardInterrupt:
        print(json.dumps(received), flush=True)
