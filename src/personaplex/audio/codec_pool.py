"""Opus encoding and decoding for many conversations at once, in worker processes.

sphn's Opus calls hold the GIL, and encoding one 80 ms frame costs about 1-2.5 ms of CPU: a
single server process runs out of CPU time for the codec alone at a few dozen real-time
conversations, whatever the GPU could serve. So each conversation's Opus stream (its encoder
and decoder state) lives in one of a few worker processes, pinned there for its whole life
because Opus state carries over from frame to frame.

The event loop talks to each worker over a pipe with no helper threads: requests are
written directly, replies are read when the pipe is readable (`loop.add_reader`), so a
thousand requests a second cost the loop little and contend with no other thread for the GIL.
Messages are raw bytes: a request is (op, stream id, request id) + payload (PCM as int16,
or the Ogg pages); a reply is (request id, ok) + payload (Ogg bytes, int16 PCM, or the error).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import subprocess
import sys

import numpy as np

from personaplex.audio.opus import OpusStreamDecoder, OpusStreamEncoder
from personaplex.errors import InvalidAudioError

_LENGTH = struct.Struct("<I")  # every message is prefixed with its length
_REQUEST = struct.Struct("<BII")  # op, stream id, request id
_REPLY = struct.Struct("<I?")  # request id, ok
_ENCODE, _DECODE, _FORGET, _PING = range(4)
_PCM_SCALE = 32767.0
STOP_TIMEOUT_S = 5.0  # a worker that has not exited this long after its socket closed is killed


def _to_int16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1.0, 1.0) * _PCM_SCALE).astype("<i2").tobytes()


def _from_int16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / _PCM_SCALE


def _framed(message: bytes) -> bytes:
    return _LENGTH.pack(len(message)) + message


def _serve(connection: socket.socket, sample_rate: int) -> None:
    """A worker process: the streams it holds, answering requests until the socket closes."""
    encoders: dict[int, OpusStreamEncoder] = {}
    decoders: dict[int, OpusStreamDecoder] = {}
    incoming = connection.makefile("rb")
    while len(header := incoming.read(_LENGTH.size)) == _LENGTH.size:
        message = incoming.read(_LENGTH.unpack(header)[0])
        op, stream, request = _REQUEST.unpack_from(message)
        payload = message[_REQUEST.size :]
        try:
            if op == _ENCODE:
                encoder = encoders.get(stream) or encoders.setdefault(stream, OpusStreamEncoder(sample_rate))
                reply = encoder.encode(_from_int16(payload))
            elif op == _DECODE:
                decoder = decoders.get(stream) or decoders.setdefault(stream, OpusStreamDecoder(sample_rate))
                reply = _to_int16(decoder.decode(payload))
            elif op == _FORGET:
                encoders.pop(stream, None)
                decoders.pop(stream, None)
                continue
            else:
                reply = b""
            connection.sendall(_framed(_REPLY.pack(request, True) + reply))
        except Exception as err:  # noqa: BLE001 - the error goes back to the conversation
            connection.sendall(_framed(_REPLY.pack(request, False) + str(err).encode()))


class _Worker:
    """One codec process and the event loop's side of its socket: requests are written to the
    stream's buffer (never blocking the loop), a reader task hands replies to their futures."""

    def __init__(self, sample_rate: int):
        self._socket, child = socket.socketpair()
        # A fresh interpreter running this module: not a fork (the server process holds CUDA and
        # threads, which a fork must not copy), nor multiprocessing's spawn, which re-imports the
        # parent's main module (the CLI's imports torch: seconds of start-up and hundreds of MB
        # in every worker). Should the server die, the worker reads the end of its socket and exits.
        self.process = subprocess.Popen([sys.executable, "-m", __name__, str(child.fileno()), str(sample_rate)],
                                        pass_fds=[child.fileno()])
        child.close()
        self.pending: dict[int, asyncio.Future] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None

    async def request(self, op: int, stream: int, request: int, payload: bytes) -> bytes:
        writer = await self._connected()
        future = asyncio.get_running_loop().create_future()
        self.pending[request] = future
        writer.write(_framed(_REQUEST.pack(op, stream, request) + payload))
        return await future

    def send(self, op: int, stream: int, payload: bytes = b"") -> None:
        """A request that needs no reply."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(_framed(_REQUEST.pack(op, stream, 0) + payload))

    async def _connected(self) -> asyncio.StreamWriter:
        if self._writer is None:
            reader, self._writer = await asyncio.open_connection(sock=self._socket)
            self._reader_task = asyncio.create_task(self._read_replies(reader))
        return self._writer

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                size = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))[0]
                message = await reader.readexactly(size)
                request, ok = _REPLY.unpack_from(message)
                future = self.pending.pop(request, None)
                if future is None or future.done():
                    continue
                payload = message[_REPLY.size :]
                if ok:
                    future.set_result(payload)
                else:
                    future.set_exception(InvalidAudioError(payload.decode(errors="replace")))
        except (asyncio.IncompleteReadError, OSError):  # the worker died
            pass
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(RuntimeError("the audio codec process stopped"))
            self.pending.clear()

    async def stop(self) -> None:
        """Close the socket (the worker then reads its end and exits) and wait for the process
        off the event loop. The transport's close completes on the loop: under uvloop, which
        holds a duplicate of the socket, a wait that blocked the loop kept the worker's socket
        open for the whole wait (every server shutdown took 5 s a worker)."""
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._socket.close()
        try:
            await asyncio.to_thread(self.process.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)


class OpusStream:
    """One conversation's Opus encoder and decoder, held by one worker process."""

    def __init__(self, pool: "OpusProcessPool", worker: _Worker, stream_id: int):
        self._pool, self._worker, self._id = pool, worker, stream_id

    async def encode(self, pcm: np.ndarray) -> bytes:
        """Ogg/Opus bytes for every whole 80 ms frame of PCM given so far (b"" if none)."""
        return await self._worker.request(_ENCODE, self._id, self._pool.next_request(), _to_int16(pcm))

    async def decode(self, message: bytes) -> np.ndarray:
        """The PCM of an Ogg/Opus message; a malformed one raises InvalidAudioError."""
        return _from_int16(await self._worker.request(_DECODE, self._id, self._pool.next_request(), message))

    def close(self) -> None:
        """Free the stream's state in its worker."""
        self._worker.send(_FORGET, self._id)


class OpusProcessPool:
    """`processes` workers, started at once; streams are spread over them in turn."""

    def __init__(self, processes: int, sample_rate: int):
        if processes < 1:
            raise ValueError(f"the Opus pool needs at least one process, got {processes}")
        self._workers = [_Worker(sample_rate) for _ in range(processes)]
        self._streams = itertools.count()
        self._requests = itertools.count(1)

    @property
    def processes(self) -> int:
        return len(self._workers)

    def next_request(self) -> int:
        return next(self._requests) % 2**32

    def stream(self) -> OpusStream:
        stream_id = next(self._streams) % 2**32
        return OpusStream(self, self._workers[stream_id % len(self._workers)], stream_id)

    async def ready(self) -> None:
        """Wait until every worker answers (their start-up imports take a second or two)."""
        await asyncio.gather(*(worker.request(_PING, 0, self.next_request(), b"") for worker in self._workers))

    async def shutdown(self) -> None:
        """Stop every worker, side by side."""
        await asyncio.gather(*(worker.stop() for worker in self._workers))


if __name__ == "__main__":  # a worker, as `_Worker` starts it
    if len(sys.argv) != 3 or not all(argument.isdigit() for argument in sys.argv[1:]):
        sys.exit("usage: python -m personaplex.audio.codec_pool SOCKET_FD SAMPLE_RATE "
                 "(a worker of the server's Opus pool: the server starts it)")
    _serve(socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]))
