"""An h2c client, Debian's python3-h2, for tests/tests/headers.rs: GET PATH from 127.0.0.1:PORT
with `cookie: a=1` and `cookie: b=2` as two fields, as browsers send cookies over HTTP/2
(RFC 9113 section 8.2.3). Prints the response's status.

  cookies.py PORT PATH
"""
import socket
import sys

import h2.config
import h2.connection
import h2.events

port, path = int(sys.argv[1]), sys.argv[2]
sock = socket.create_connection(("127.0.0.1", port), timeout=10)
conn = h2.connection.H2Connection(
    config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
conn.initiate_connection()
conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "cookies.test"),
                      (":path", path), ("cookie", "a=1"), ("cookie", "b=2")], end_stream=True)
sock.sendall(conn.data_to_send())
status = None
while True:
    data = sock.recv(65536)
    if not data:
        sys.exit("closed before the response ended")
    for event in conn.receive_data(data):
        if isinstance(event, h2.events.ResponseReceived):
            status = dict(event.headers)[":status"]
        if isinstance(event, h2.events.StreamEnded):
            print(status)
            sys.exit(0)
    sock.sendall(conn.data_to_send())
