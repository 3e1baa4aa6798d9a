#!/usr/bin/env python3
"""A TCP proxy that adds a round-trip time, for benchmarks on loopback.

This kernel has no netem, so latency comes from here: every burst of bytes
the client sends waits RTT milliseconds before it is forwarded, so each HTTP
request costs one round trip, as it would across a network. Bandwidth is
shaped separately (tc htb on lo).

    delay-proxy.py LISTEN_PORT UPSTREAM_PORT RTT_MS
"""
import asyncio
import sys


async def pipe(reader, writer, delay):
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main():
    listen, upstream, rtt_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])

    async def handle(client_reader, client_writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pipe(client_reader, up_writer, rtt_ms / 1000.0),
            pipe(up_reader, client_writer, 0),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
