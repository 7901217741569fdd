"""A real gRPC server and client (grpcio) for tests/tests/http2.rs, without generated code:
methods take and return raw bytes.

  echo.py serve PORT          h2c server: /test.Echo/Say returns the request reversed;
                              /test.Echo/Fail fails with NOT_FOUND "nothing here"
  echo.py call PORT CA HOST   over TLS (CA's certificate for HOST) to 127.0.0.1:PORT: calls
                              both and prints "say: <reply>" and "fail: <code> <details>"
  echo.py call-h2c PORT HOST  the same in plaintext HTTP/2 (h2c), with HOST as :authority
  echo.py flaky PORT CA HOST  over TLS: calls /test.Echo/Flaky and /test.Plain/Flaky once
                              each, which fail with UNAVAILABLE the first time they see a
                              payload; prints "echo: <reply or code>" and "plain: ..."
"""
import sys
from concurrent import futures

import grpc


def identity(b):
    return b


def serve(port):
    def say(request, context):
        return request[::-1]

    def fail(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "nothing here")

    seen = set()

    def flaky(request, context):
        if request not in seen:
            seen.add(request)
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return request

    methods = {
        "Say": grpc.unary_unary_rpc_method_handler(say, identity, identity),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, identity, identity),
        "Flaky": grpc.unary_unary_rpc_method_handler(flaky, identity, identity),
    }
    handlers = [grpc.method_handlers_generic_handler(name, methods) for name in ("test.Echo", "test.Plain")]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(handlers)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def secure_channel(port, ca, host):
    creds = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
    options = (("grpc.ssl_target_name_override", host), ("grpc.default_authority", host))
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options)


def call(port, ca, host):
    with secure_channel(port, ca, host) as channel:
        both(channel)


def flaky(port, ca, host):
    with secure_channel(port, ca, host) as channel:
        for service, payload in (("Echo", b"first"), ("Plain", b"second")):
            method = channel.unary_unary(f"/test.{service}/Flaky", identity, identity)
            try:
                print(f"{service.lower()}:", method(payload, timeout=10).decode())
            except grpc.RpcError as e:
                print(f"{service.lower()}:", e.code().name, e.details())


def call_h2c(port, host):
    with grpc.insecure_channel(f"127.0.0.1:{port}", (("grpc.default_authority", host),)) as channel:
        both(channel)


def both(channel):
    say = channel.unary_unary("/test.Echo/Say", identity, identity)
    print("say:", say(b"hello", timeout=10).decode())
    fail = channel.unary_unary("/test.Echo/Fail", identity, identity)
    try:
        fail(b"x", timeout=10)
        print("fail: no error")
    except grpc.RpcError as e:
        print("fail:", e.code().name, e.details())


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "call-h2c":
        call_h2c(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "flaky":
        flaky(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        call(int(sys.argv[2]), sys.argv[3], sys.argv[4])
