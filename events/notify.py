"""Cross-process commit wake-ups.

Every process that waits for new events binds a Unix datagram socket in the
Linux abstract namespace and registers its name as an empty file in a folder
beside the database. A writer, after each commit, sends one byte to every
registered socket. Waiting is therefore a wake-up (the event loop watches the
socket), not a sleep loop; a stale registration (its process died) is removed
when a send to it is refused. Waiters still re-check the database on a slow
safety timer, so a lost datagram delays a reader by at most that interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

_PREFIX = "boothd-"


def _address(token: str) -> str:
    return "\0" + _PREFIX + token


class CommitNudger:
    """Sends a wake-up datagram to every registered listener (thread-safe enough:
    it is only called from the store's single writer thread)."""

    def __init__(self, folder: Path, own_token: str | None = None) -> None:
        self._folder = folder
        self._folder_str = str(folder)  # stat() per commit: skip pathlib's overhead
        self._own = own_token
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._names: list[str] = []
        self._mtime_ns = -1

    def set_own_token(self, token: str | None) -> None:
        self._own = token

    def _refresh(self) -> None:
        try:
            mtime = os.stat(self._folder_str).st_mtime_ns
        except FileNotFoundError:
            self._names = []
            return
        # The folder's mtime changes whenever a listener registers or leaves,
        # so the listing is re-read only then.
        if mtime != self._mtime_ns:
            self._mtime_ns = mtime
            self._names = [n for n in os.listdir(self._folder) if n != self._own]

    def nudge(self) -> None:
        self._refresh()
        for name in self._names:
            try:
                self._sock.sendto(b"!", _address(name))
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(FileNotFoundError):
                    (self._folder / name).unlink()
            except (BlockingIOError, OSError):
                # A full receive buffer means that listener already has
                # wake-ups pending; nothing is lost by dropping this one.
                pass

    def close(self) -> None:
        self._sock.close()


class CommitListener:
    """Calls `on_wake` in the event loop whenever another process commits."""

    def __init__(self, folder: Path, on_wake: Callable[[], None]) -> None:
        self._folder = folder
        self._on_wake = on_wake
        self.token = f"{os.getpid()}-{secrets.token_hex(6)}"
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(_address(self.token))
        self._sock = sock
        (self._folder / self.token).touch()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                self._sock.recv(64)
            except BlockingIOError:
                break
            except OSError:
                break
        self._on_wake()

    def close(self) -> None:
        if self._sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        with contextlib.suppress(FileNotFoundError):
            (self._folder / self.token).unlink()
