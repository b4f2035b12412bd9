"""A TCP forwarder from one network namespace's loopback to the root namespace's.

Agents in the lab run inside node namespaces, where 127.0.0.1 is the node's own
loopback; etcd runs on the root namespace's loopback.  This process opens its listening
socket inside the node namespace (setns just for that socket's creation; a socket keeps
the namespace it was made in), switches back, and relays each connection to
127.0.0.1:<to> in the root namespace.  Traffic never leaves the two loopbacks.

Standalone on purpose (stdlib only): the demo leaves it running after `make demo` exits.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import socket
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def listen_in(netns: str, port: int) -> socket.socket:
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        setns(target)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(128)
    finally:
        setns(own)
        os.close(own)
        os.close(target)
    return s


def pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listener: socket.socket, to_port: int) -> None:
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", to_port), timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()  # etcd is down: the client sees a reset and retries
            continue
        # gRPC sets TCP_NODELAY on its own sockets; a relay without it reintroduces
        # Nagle + delayed-ACK stalls (~40 ms) whenever a client sends two small frames.
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--netns", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--to", type=int, required=True)
    a = ap.parse_args()
    serve(listen_in(a.netns, a.port), a.to)


if __name__ == "__main__":
    main()
