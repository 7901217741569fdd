"""A TCP echo server for the traffic capture tests, and its client.

    echo.py PORT                 serve on PORT of every address: send back what comes
    echo.py send HOST:PORT HEX   send the bytes HEX, half-close, print what came back (hex)
    echo.py drip HOST:PORT HEX S the same, a byte every S seconds, each echo read before the next
"""
import socket
import sys
import threading
import time


def serve(port):
    server = socket.create_server(("0.0.0.0", port), reuse_port=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def send(addr, data):
    host, port = addr.rsplit(":", 1)
    got = b""
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        # A server that closes unread (a refusal) resets the connection: nothing came back,
        # and a send, the half-close (ENOTCONN) or a read may fail, depending on when.
        try:
            conn.sendall(bytes.fromhex(data))
            conn.shutdown(socket.SHUT_WR)
            while chunk := conn.recv(65536):
                got += chunk
        except OSError as e:
            if got or isinstance(e, TimeoutError):
                raise
    sys.stdout.write(got.hex())


def drip(addr, data, pause):
    host, port = addr.rsplit(":", 1)
    got = b""
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        try:
            for byte in bytes.fromhex(data):
                time.sleep(pause)
                conn.sendall(bytes([byte]))
                got += conn.recv(1)
        except (BrokenPipeError, ConnectionResetError):
            pass
    sys.stdout.write(got.hex())


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "drip":
        drip(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        serve(int(sys.argv[1]))
