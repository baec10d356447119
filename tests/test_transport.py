"""The HTTP listener: connections it accepts send each SSE event at once (Nagle's algorithm off)."""

import asyncio
import socket

from server.runner import bind_listening_socket


def test_accepted_connections_have_nagle_off():
    """asyncio sets TCP_NODELAY only on sockets that say IPPROTO_TCP; with Nagle on, the event written right
    after the headers waited for the client's delayed ACK (~40 ms on every streamed first token)."""
    listener = bind_listening_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, sock=listener)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.read()
            writer.close()

    asyncio.run(main())
    assert seen == [1]
