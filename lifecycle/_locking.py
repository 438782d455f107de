"""The per-lifecycle lock: re-entrant for its owner, where the owner is a (thread, asyncio task)
pair, not a thread.

A ``threading.RLock`` counts every asyncio task on the loop's thread as its owner, so a task
could enter a lifecycle while another task's request was suspended at an ``await``.
Here a second task on the owner's thread cannot wait (it would block the loop that must resume
the owner), so it is refused at once with ``LockConflict``; a task or thread elsewhere waits.
"""

from __future__ import annotations

import threading
from asyncio import current_task
from asyncio.events import _get_running_loop
from types import TracebackType

Owner = tuple[int, object]


def owner_token() -> Owner:
    """Who is calling: this thread, and the asyncio task running on it (None outside a loop)."""
    loop = _get_running_loop()
    return (threading.get_ident(), current_task(loop) if loop is not None else None)


class LockConflict(RuntimeError):
    """Another asyncio task on this thread holds the lock: waiting would deadlock the loop."""


class OwnerLock:
    """A re-entrant lock whose owner is ``owner_token()``.

    Lifecycles that share one module share one ``OwnerLock`` (``lifecycle._holds``), so their
    requests and transitions on that module run one at a time; other modules never wait.
    """

    __slots__ = ("_depth", "_lock", "_owner")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: Owner | None = None
        self._depth = 0

    def acquire(self) -> None:
        # owner_token(), inline: every transition and request takes this lock.
        loop = _get_running_loop()
        token = (threading.get_ident(), current_task(loop) if loop is not None else None)
        owner = self._owner
        # Only the owner's own thread ever writes a token carrying its thread id, so this read
        # cannot be stale in a way that matters.
        if owner is not None and owner[0] == token[0]:
            if owner[1] is token[1]:
                self._depth += 1
                return
            raise LockConflict(
                f"another asyncio task ({_task_name(owner[1])}) on this thread is inside this "
                "lifecycle (a request or transition suspended at an await); await it first, or "
                "run this call in a worker thread (asyncio.to_thread)"
            )
        self._lock.acquire()
        self._owner = token
        self._depth = 1

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()

    def held_by_caller(self) -> bool:
        return self._owner is not None and self._owner == owner_token()

    def __enter__(self) -> OwnerLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _task_name(task: object) -> str:
    get_name = getattr(task, "get_name", None)
    return str(get_name()) if callable(get_name) else "no task"
