"""An HTTP/2 (h2c) server, Debian's python3-h2, for tests/tests/http2.rs: it refuses the first
request for each path under /refuse-once/ with RST_STREAM(REFUSED_STREAM), as an overloaded
server does (RFC 9113 section 8.7), and answers every other request with "answered PATH".
It prints "refused PATH" or "answered PATH" for each.

  refuser.py PORT
"""
import socket
import sys
import threading

import h2.config
import h2.connection
import h2.errors
import h2.events

seen = set()
lock = threading.Lock()


def serve(sock):
    config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    answering = {}
    while True:
        data = sock.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers)[":path"]
                with lock:
                    first = path not in seen
                    seen.add(path)
                if path.startswith("/refuse-once/") and first:
                    conn.reset_stream(event.stream_id, error_code=h2.errors.ErrorCodes.REFUSED_STREAM)
                    print("refused", path, flush=True)
                else:
                    answering[event.stream_id] = path
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id in answering:
                path = answering.pop(event.stream_id)
                body = f"answered {path}".encode()
                conn.send_headers(event.stream_id, [(":status", "200"), ("content-length", str(len(body)))])
                conn.send_data(event.stream_id, body, end_stream=True)
                print("answered", path, flush=True)
        sock.sendall(conn.data_to_send())
    sock.close()


def main(port):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]))
