# -*- test-case-name: estat.test.test_dlq -*-
"""
The disk dead-letter queue: encoded objects the store would not take wait
in C{DLQ_DIR} and are retried under their own key until they are stored,
too old (C{DLQ_MAX_AGE}) or the queue is full (C{DLQ_MAX_SIZE_BYTES}).

Each file is written atomically (temporary file, fsync, rename) and named
C{<creation time in ns>-<random>.dlq}, so names sort by age.  It holds one
JSON header line (key, event count, body size, body MD5) and the gzip body.

The retry loop never lists the whole directory: a pass reads at most
C{scan_limit} (1,000) entries with C{os.scandir}, stopping early, retries
the oldest of them, and drains back to back while the store takes them.
Every directory and file operation runs in a worker thread; nothing here
blocks the reactor.  The loop body never lets an error escape.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Callable

import attr
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .encoder import EncodedObject, content_md5
from .fsutil import TEMP_PREFIX, atomic_write, process_running
from .interfaces import IDeadLetterQueue
from .metrics import Metrics

__all__ = ["DiskDeadLetterQueue", "DLQFile", "read_dlq_file", "encode_dlq_file", "SUFFIX"]

SUFFIX = ".dlq"
QUARANTINE = "quarantine"


class CorruptFile(ValueError):
    """
    A dead-letter file that cannot be read back as it was written.
    """


def encode_dlq_file(obj: EncodedObject, created: float) -> bytes:
    header = {
        "key": obj.key,
        "count": obj.count,
        "size": len(obj.body),
        "md5": obj.content_md5,
        "poison": obj.poison,
        "created": created,
    }
    return json.dumps(header, separators=(",", ":")).encode("utf-8") + b"\n" + obj.body


def read_dlq_file(path: str) -> EncodedObject:
    """
    Read and verify one dead-letter file.

    @raise CorruptFile: if it is truncated, altered or not one at all.
    """
    with open(path, "rb") as f:
        return decode_dlq_file(f.read())


def decode_dlq_file(data: bytes) -> EncodedObject:
    """
    Verify and decode the bytes of one dead-letter file.

    @raise CorruptFile: if they are truncated, altered or not one at all.
    """
    newline = data.find(b"\n")
    if newline < 0 or newline > 65536:
        raise CorruptFile("no header line")
    try:
        header = json.loads(data[:newline])
        key, count, size, md5 = header["key"], header["count"], header["size"], header["md5"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptFile(f"bad header: {e}") from None
    body = data[newline + 1:]
    if len(body) != size:
        raise CorruptFile(f"body is {len(body)} bytes, header says {size}")
    if content_md5(body) != md5:
        raise CorruptFile("body does not match its MD5")
    return EncodedObject(key=key, body=body, count=count, content_md5=md5,
                         poison=bool(header.get("poison", False)))


class Claim:
    """
    An exclusive claim on one dead-letter file: an C{flock} held from
    reading it to deleting it, so that the server's retry loop and
    C{estat-dlq replay} never upload the same file at the same time.
    Every method blocks on disk: call them in a thread.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def take(cls, path: str) -> "Claim | None":
        """
        Claim C{path}, or return C{None} if it is gone or claimed by
        someone else.
        """
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder before us may have deleted it (after uploading it).
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise FileNotFoundError(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def read(self) -> EncodedObject:
        chunks = []
        os.lseek(self.fd, 0, os.SEEK_SET)
        while True:
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return decode_dlq_file(b"".join(chunks))

    def remove(self) -> None:
        os.unlink(self.path)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def dlq_file_created(name: str) -> float:
    """
    The creation time (epoch seconds) encoded in a dead-letter file name.
    """
    return int(name.split("-", 1)[0]) / 1e9


@attr.s(slots=True, frozen=True)
class DLQFile:
    name: str = attr.ib()
    size: int = attr.ib()


@attr.s(slots=True, frozen=True)
class ScanResult:
    """
    One bounded look at the directory.

    @ivar oldest: the oldest eligible file among the entries read, or None.
    @ivar expired: files among them older than the maximum age.
    @ivar scanned: how many entries were read (at most the scan limit).
    """

    oldest: DLQFile | None = attr.ib()
    expired: list = attr.ib()
    scanned: int = attr.ib()


@implementer(IDeadLetterQueue)
@attr.s(eq=False)
class DiskDeadLetterQueue(Service):
    """
    @ivar deliver: C{EncodedObject -> Deferred[bool]}: one upload attempt
        (the uploader's C{put_with_retries} with no retries).
    @ivar interval: seconds between passes while the store is failing or
        the queue is empty.
    @ivar max_backoff: the longest wait after repeated failures.
    """

    log = Logger()

    directory: str = attr.ib()
    metrics: Metrics = attr.ib()
    clock: IReactorTime = attr.ib()
    run_in_thread: Callable[..., Deferred] = attr.ib()
    deliver: Callable[[EncodedObject], Deferred] | None = attr.ib(default=None)
    max_age: float = attr.ib(default=24 * 3600.0)
    max_bytes: int = attr.ib(default=19327352832)
    interval: float = attr.ib(default=5.0)
    max_backoff: float = attr.ib(default=60.0)
    scan_limit: int = attr.ib(default=1000)
    entropy: Callable[[int], bytes] = attr.ib(default=os.urandom)
    #: Other processes (the other workers of C{WORKERS=N}) use this
    #: directory too: the files and bytes are counted again from the
    #: directory at most every C{interval} seconds, since the others add
    #: and remove files this process does not see.
    shared: bool = attr.ib(default=False)

    files: int = attr.ib(default=0, init=False)
    bytes: int = attr.ib(default=0, init=False)
    _reserved: int = attr.ib(default=0, init=False)
    _writes: dict = attr.ib(factory=dict, init=False)
    _retry_at: dict = attr.ib(factory=dict, init=False)
    _retry_delay: dict = attr.ib(factory=dict, init=False)
    _delay: float = attr.ib(default=0.0, init=False)
    _next: object = attr.ib(default=None, init=False)
    _pass: Deferred | None = attr.ib(default=None, init=False)
    _attempt: Deferred | None = attr.ib(default=None, init=False)
    _retrying: bool = attr.ib(default=False, init=False)
    _ready: Deferred | None = attr.ib(default=None, init=False)
    _last_name: int = attr.ib(default=0, init=False)
    #: True until the start-up listing is counted; names written meanwhile.
    _recovering: bool = attr.ib(default=True, init=False)
    _early_writes: set = attr.ib(factory=set, init=False)
    _counted_at: float = attr.ib(default=0.0, init=False)

    # --- service ---

    def startService(self) -> None:
        super().startService()
        self._retrying = True
        self._recovering = True
        self._delay = self.interval
        self._ready = self.run_in_thread(self._recover)
        self._ready.addCallbacks(self._recovered, self._recover_failed)
        self._pass = self._ready

    def _recover(self) -> tuple[dict, int]:
        """
        At start-up (in a thread): create the directory, remove temporary
        files a crash left behind, and list what the last process left.
        This is the only full listing of the directory.
        """
        os.makedirs(os.path.join(self.directory, QUARANTINE), exist_ok=True)
        ours = f"{TEMP_PREFIX}{os.getpid()}-"
        found = {}
        removed = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(TEMP_PREFIX):
                    if entry.name.startswith(ours) or _writer_alive(entry.name):
                        continue  # a write in progress right now (ours or another worker's)
                    try:
                        os.unlink(entry.path)
                        removed += 1
                    except OSError:
                        pass
                elif entry.name.endswith(SUFFIX) and entry.is_file():
                    try:
                        found[entry.name] = entry.stat().st_size
                    except FileNotFoundError:
                        pass
        return found, removed

    def _recovered(self, result) -> None:
        found, removed = result
        # Files this process wrote while the listing ran are counted already.
        old = {name: size for name, size in found.items() if name not in self._early_writes}
        self._recovering = False
        self._early_writes.clear()
        self.files += len(old)
        self.bytes += sum(old.values())
        self._update_gauges()
        if removed:
            self.log.warn("removed {count} unfinished dead-letter writes left by a crash",
                          count=removed)
        if old:
            self.log.info("dead-letter queue {directory} holds {files} files ({bytes} bytes) "
                          "from before; retrying them", directory=self.directory,
                          files=len(old), bytes=sum(old.values()))
        self._pass = None
        self._counted_at = self.clock.seconds()
        self._schedule(0 if self.files else self.interval)

    def _recover_failed(self, failure) -> None:
        self._recovering = False
        self._early_writes.clear()
        self._pass = None
        self.metrics.loop_errors.labels("dlq").inc()
        self.log.failure("could not open the dead-letter queue {directory}", failure,
                         directory=self.directory)
        self._schedule(self.interval)

    def store_is_back(self) -> None:
        """
        The store has just taken an upload.  If the retry loop is backing
        off after an outage, end the wait now (and forget the files' own
        waits) rather than up to a minute later.
        """
        if not self._retrying or self._delay <= self.interval:
            return
        self.log.info("the store is taking uploads again; retrying the dead-letter queue now")
        self._delay = self.interval
        self._retry_at.clear()
        self._retry_delay.clear()
        if self._next is not None and self._next.active():
            self._next.reset(0)

    def stop_retrying(self) -> Deferred:
        """
        Stop the retry loop: cancel an upload in flight (its file stays) and
        fire when no pass is running.  L{put} keeps working.
        """
        self._retrying = False
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._attempt is not None:
            self._attempt.cancel()
        return self._wait(self._pass)

    def stopService(self) -> Deferred:
        super().stopService()
        d = self.stop_retrying()
        d.addCallback(lambda _: self.writes_done())
        return d

    def writes_done(self) -> Deferred:
        """
        Fire when every L{put} begun so far has finished.
        """
        return DeferredList([self._wait(d) for d in list(self._writes)]).addCallback(lambda _: None)

    @staticmethod
    def _wait(d: Deferred | None) -> Deferred:
        if d is None or d.called:
            return succeed(None)
        waiter = Deferred()
        d.addBoth(lambda r: (waiter.callback(None), r)[1])
        return waiter

    def _update_gauges(self) -> None:
        self.metrics.dlq_files_current.set(self.files)
        self.metrics.dlq_bytes_current.set(self.bytes)

    # --- writing ---

    def _new_name(self) -> str:
        # Nanoseconds of the clock, never repeated within this process.
        ns = max(int(self.clock.seconds() * 1e9), self._last_name + 1)
        self._last_name = ns
        return f"{ns:020d}-{self.entropy(4).hex()}{SUFFIX}"

    def put(self, obj: EncodedObject) -> Deferred:
        created = self.clock.seconds()
        data = encode_dlq_file(obj, created)
        size = len(data)
        if self.bytes + self._reserved + size > self.max_bytes:
            self._drop(obj, "dlq_full",
                       "dead-letter queue is full ({bytes} of {max_bytes} bytes); "
                       "dropped {count} events of {key}",
                       bytes=self.bytes + self._reserved, max_bytes=self.max_bytes)
            return succeed(False)
        name = self._new_name()
        self._reserved += size
        d = self.run_in_thread(atomic_write, os.path.join(self.directory, name), data)
        d.addCallbacks(self._written, self._write_failed,
                       callbackArgs=(obj, name, size), errbackArgs=(obj, size))
        self._writes[d] = None
        d.addBoth(self._forget_write, d)
        return d

    def _forget_write(self, result, d):
        self._writes.pop(d, None)
        return result

    def _written(self, _, obj: EncodedObject, name: str, size: int) -> bool:
        if self._recovering:
            self._early_writes.add(name)
        self._reserved -= size
        self.files += 1
        self.bytes += size
        self._update_gauges()
        self.metrics.dlq_events_enqueued.inc(obj.count)
        self.log.warn("kept {count} events of {key} in the dead-letter queue as {name}",
                      count=obj.count, key=obj.key, name=name)
        return True

    def _write_failed(self, failure, obj: EncodedObject, size: int) -> bool:
        self._reserved -= size
        self._drop(obj, "dlq_write_failed",
                   "could not write {count} events of {key} to the dead-letter queue: "
                   "{error}; they are lost", error=failure.getErrorMessage())
        return False

    def _drop(self, obj: EncodedObject, reason: str, message: str, **fields) -> None:
        self.metrics.dlq_events_dropped.inc(obj.count)
        self.metrics.events_dropped.labels(reason).inc(obj.count)
        self.log.error(message, count=obj.count, key=obj.key, reason=reason, **fields)

    # --- the retry loop ---

    def _schedule(self, delay: float) -> None:
        if not self._retrying:
            return
        self._next = self.clock.callLater(delay, self._run_pass)

    def _run_pass(self) -> None:
        self._next = None
        self._pass = Deferred.fromCoroutine(self._pass_body())
        self._pass.addBoth(self._pass_done)

    def _pass_done(self, result) -> None:
        self._pass = None
        self._schedule(result if isinstance(result, (int, float)) else self.interval)

    async def _pass_body(self) -> float:
        """
        Retry files while the store takes them.  Returns the delay before
        the next pass.  Never raises.
        """
        try:
            failures = 0
            while self._retrying:
                if self.shared and self.clock.seconds() - self._counted_at >= self.interval:
                    await self.recount()
                outcome = await self.retry_oldest()
                if outcome == "empty":
                    self._delay = self.interval
                    return self.interval
                if outcome == "failed":
                    failures += 1
                    if failures >= 2:
                        # Two files in a row refused: the store is down, wait.
                        delay = self._delay
                        self._delay = min(self.max_backoff, self._delay * 2)
                        return delay
                    # One file refused: it is in its own backoff now; try the
                    # next, so that one bad file never holds up the others.
                    continue
                # "stored", "quarantined", "skipped": go on back to back.
                failures = 0
                self._delay = self.interval
            return self.interval
        except CancelledError:
            return self.interval
        except Exception:
            self.metrics.loop_errors.labels("dlq").inc()
            self.log.failure("error in the dead-letter retry loop")
            return self.interval

    async def recount(self) -> None:
        """
        Count the directory's files and bytes again (in a thread), for a
        directory other processes share.
        """
        self._counted_at = self.clock.seconds()
        files, size = await self.run_in_thread(self._count)
        self.files, self.bytes = files, size
        self._update_gauges()

    def _count(self) -> tuple[int, int]:
        files = size = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.endswith(SUFFIX) and not entry.name.startswith(TEMP_PREFIX):
                    try:
                        size += entry.stat().st_size
                    except FileNotFoundError:
                        continue
                    files += 1
        return files, size

    def scan(self, retry_at: dict | None = None) -> ScanResult:
        """
        In a thread: read at most C{scan_limit} entries and pick the oldest
        eligible file; collect expired ones.  Files in per-file backoff are
        passed over.
        """
        now = self.clock.seconds()
        retry_at = {} if retry_at is None else retry_at
        oldest = None
        expired = []
        scanned = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if scanned >= self.scan_limit:
                    break
                scanned += 1
                name = entry.name
                if not name.endswith(SUFFIX) or name.startswith(TEMP_PREFIX):
                    continue
                try:
                    created = dlq_file_created(name)
                except ValueError:
                    continue
                if retry_at.get(name, 0) > now:
                    continue
                if now - created > self.max_age:
                    expired.append(DLQFile(name, entry.stat().st_size))
                    continue
                if oldest is None or name < oldest:
                    oldest = name
        if oldest is None:
            return ScanResult(None, expired, scanned)
        try:
            size = os.stat(os.path.join(self.directory, oldest)).st_size
        except FileNotFoundError:
            return ScanResult(None, expired, scanned)
        return ScanResult(DLQFile(oldest, size), expired, scanned)

    def _quarantine(self, name: str) -> None:
        os.replace(os.path.join(self.directory, name),
                   os.path.join(self.directory, QUARANTINE, name))

    def _forget(self, f: DLQFile) -> None:
        self.files = max(0, self.files - 1)
        self.bytes = max(0, self.bytes - f.size)
        self._retry_at.pop(f.name, None)
        self._retry_delay.pop(f.name, None)
        self._update_gauges()

    async def retry_oldest(self) -> str:
        """
        One step of the loop: expire what is too old, then retry the
        oldest file seen.

        @return: C{"empty"}, C{"stored"}, C{"failed"} or C{"quarantined"}.
        """
        result = await self.run_in_thread(self.scan, dict(self._retry_at))
        expired = 0
        for f in result.expired:
            expired += await self._expire(f)
        if result.oldest is None:
            return "skipped" if expired else "empty"
        f = result.oldest
        claim = await self.run_in_thread(Claim.take, os.path.join(self.directory, f.name))
        if claim is None:
            # Gone, or claimed by `estat-dlq replay`: look again later.
            self._retry_at[f.name] = self.clock.seconds() + self.interval
            return "skipped"
        try:
            return await self._retry_claimed(f, claim)
        finally:
            claim.release()

    async def _retry_claimed(self, f: DLQFile, claim: Claim) -> str:
        try:
            obj = await self.run_in_thread(claim.read)
        except (CorruptFile, OSError) as e:
            await self.run_in_thread(self._quarantine, f.name)
            self._forget(f)
            self.metrics.dlq_files_quarantined.inc()
            self.log.error("dead-letter file {name} is unreadable ({error}); moved to "
                           "{quarantine}", name=f.name, error=str(e),
                           quarantine=os.path.join(self.directory, QUARANTINE))
            return "quarantined"
        # ensureDeferred: a coroutine function is a fine deliver too.
        self._attempt = ensureDeferred(self.deliver(obj))
        try:
            stored = await self._attempt
        finally:
            self._attempt = None
        if not stored:
            # This file waits longer each time it fails, so that one file the
            # store keeps refusing cannot hold up the others.
            delay = self._retry_delay.get(f.name, self.interval)
            self._retry_at[f.name] = self.clock.seconds() + delay
            self._retry_delay[f.name] = min(self.max_backoff, delay * 2)
            return "failed"
        await self.run_in_thread(claim.remove)
        self._forget(f)
        self.metrics.dlq_events_recovered.inc(obj.count)
        self.log.info("stored {count} events of {key} from the dead-letter queue",
                      count=obj.count, key=obj.key)
        return "stored"

    async def _expire(self, f: DLQFile) -> bool:
        count = await self.run_in_thread(self._remove_expired, f.name)
        if count is None:
            # Claimed (by `estat-dlq replay`, uploading it right now) or
            # already gone: not ours to drop.  Look again later.
            self._retry_at[f.name] = self.clock.seconds() + self.interval
            return False
        self._forget(f)
        self.metrics.dlq_events_dropped.inc(count)
        self.metrics.events_dropped.labels("dlq_expired").inc(count)
        self.log.error("dead-letter file {name} is older than {max_age}s; deleted, "
                       "{count} events lost", name=f.name, max_age=self.max_age,
                       count=count, reason="dlq_expired")
        return True

    def _remove_expired(self, name: str) -> int | None:
        """
        In a thread: delete an expired file under its claim, so that a file
        another process is uploading at this moment is never deleted and
        counted as dropped.

        @return: its event count, or C{None} if it is claimed or gone.
        """
        claim = Claim.take(os.path.join(self.directory, name))
        if claim is None:
            return None
        try:
            try:
                count = _count_events_fd(claim.fd)
            except (OSError, ValueError, KeyError, TypeError):
                count = 0
            claim.remove()
            return count
        finally:
            claim.release()


def _writer_alive(name: str) -> bool:
    """
    Whether the process that began the temporary file C{name}
    (C{.tmp-<pid>-<random>}) still runs.
    """
    pid_text = name[len(TEMP_PREFIX):].split("-", 1)[0]
    try:
        return process_running(int(pid_text))
    except ValueError:
        return False


def _count_events_fd(fd: int) -> int:
    os.lseek(fd, 0, os.SEEK_SET)
    head = os.read(fd, 65536)
    return int(json.loads(head[:head.index(b"\n")])["count"])
