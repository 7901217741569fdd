"""An upstream for examples/tracing: answers 200 and prints the trace headers it received.

  python3 examples/tracing/upstream.py PORT
"""
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

TRACE = ("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
         "x-b3-sampled", "x-b3-flags")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        seen = {k.lower(): v for k, v in self.headers.items() if k.lower() in TRACE}
        print(self.path, " ".join(f"{k}={v}" for k, v in sorted(seen.items())), flush=True)
        body = b"reviews\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
