#!/usr/bin/env python3
"""A TCP proxy that adds a round-trip time, for benchmarks on loopback.

This kernel has no netem, so latency comes from here: every burst of bytes
the client sends waits RTT milliseconds before it is forwarded, so each HTTP
request costs one round trip, as it would across a network. Bandwidth is
shaped separately (tc htb on lo).

Replies go back with splice(2) through a pipe, so the kernel moves them
without copying them into this process: on a real link no process on the
node relays the bytes, and on a machine of two cores a relay that copies
every byte twice takes CPU from the system under test (with asyncio and
64 KiB reads it used 0.55 s of CPU to relay one 273 MB cold start).

    delay-proxy.py LISTEN_PORT UPSTREAM_PORT RTT_MS
"""
import fcntl
import os
import socket
import sys
import threading
import time

PIPE_BYTES = 1 << 20


def shut(sock, how):
    try:
        sock.shutdown(how)
    except OSError:
        pass


def requests(client, upstream, delay):
    """Client -> upstream: each burst waits `delay` seconds, then goes on."""
    try:
        while True:
            data = client.recv(1 << 16)
            if not data:
                break
            if delay:
                time.sleep(delay)
            upstream.sendall(data)
    except OSError:
        pass
    shut(upstream, socket.SHUT_WR)


def replies(upstream, client):
    """Upstream -> client, spliced through a pipe (no copy in this process)."""
    r, w = os.pipe()
    try:
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # the default pipe size still works, in smaller steps
        src, dst = upstream.fileno(), client.fileno()
        while True:
            n = os.splice(src, w, PIPE_BYTES)
            if n == 0:
                break
            while n > 0:
                n -= os.splice(r, dst, n)
    except OSError:
        pass
    finally:
        os.close(r)
        os.close(w)
    shut(client, socket.SHUT_WR)


def handle(client, upstream_port, delay):
    try:
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
    except OSError:
        client.close()
        return
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=replies, args=(upstream, client), daemon=True)
    back.start()
    requests(client, upstream, delay)
    back.join()
    client.close()
    upstream.close()


def main():
    listen, upstream_port, rtt_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    server = socket.create_server(("127.0.0.1", listen), backlog=128)
    while True:
        client, _ = server.accept()
        threading.Thread(target=handle, args=(client, upstream_port, rtt_ms / 1000.0),
                         daemon=True).start()


if __name__ == "__main__":
    main()
