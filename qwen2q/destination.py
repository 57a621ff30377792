"""Where a conversion writes its checkpoint, and the rules that keep the user's files safe.

A run into DST goes through four steps, each owned here:

1. `check_destination` (before any work): DST is not SRC, not inside it and does not contain it; it is
   not a symlink or a file; if it is a non-empty directory, it is replaced only with `force=True`, and
   only if it is a checkpoint qwen2q wrote (`is_qwen2q_checkpoint`): a config.json carrying the
   "qwen2q" note and nothing else but files qwen2q writes.  Anything else is refused, `force` or not.
2. `DestinationLock` (the whole run): an exclusive `flock` on the hidden file `.NAME.qwen2q-lock` beside
   DST, so a second run into the same DST fails at once instead of racing the first.
3. The output is built in the hidden directory `.NAME.partial-PID` beside DST, marked as ours by the
   file `.qwen2q-partial`; a failed run deletes it, a killed one leaves it for the next run into DST to
   delete (under the lock, so it cannot be a live run's).
4. `install` (the end): with SIGINT/SIGTERM deferred, DST is checked again; an empty or missing DST is
   replaced by one rename(2), which itself fails if anything was written into DST meanwhile; a DST that
   `force` replaces is first renamed aside to `.NAME.replaced-PID`, checked again there, and deleted only
   once the new checkpoint is in place.  If DST changed during the run, the new checkpoint is kept
   beside it under a visible name and the error says where: nothing is lost on either side.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path

from qwen2q.errors import Qwen2qError

PARTIAL_MARKER = ".qwen2q-partial"
CONFIG = "config.json"
# Every file name a qwen2q conversion can leave in its output directory.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "README.md", "LICENSE")
EXTRA_FILES = ("qwen2q_mixed.json",)  # what qwen2q itself adds (a mixed-precision profile, `qwen2q.mixed`)
WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")


class DestinationError(Qwen2qError):
    """DST cannot be written or replaced without risking files the user owns."""


def is_qwen2q_checkpoint(path: Path) -> tuple[bool, str]:
    """Whether directory `path` is a checkpoint qwen2q could have written, and if not, why not (a phrase)."""
    foreign = []
    for entry in sorted(path.iterdir()):
        name = entry.name
        ours = name == CONFIG or name in SIDE_FILES or name in EXTRA_FILES or WEIGHT_FILE.match(name)
        if not ours or entry.is_symlink() or not entry.is_file():
            foreign.append(name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return False, f"it holds {shown}, which qwen2q does not write"
    try:
        note = json.loads((path / CONFIG).read_text()).get("qwen2q")
    except (OSError, ValueError, AttributeError):
        note = None
    if not isinstance(note, dict):
        return False, "its config.json has no \"qwen2q\" note, so qwen2q did not write it"
    return True, ""


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuse a DST that this run must not write or replace (rule 1 above); create nothing."""
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise DestinationError(f"destination {dst} is the source or inside it; choose a directory outside {src}")
    if d in s.parents:
        raise DestinationError(f"destination {dst} contains the source {src}; choose another directory")
    if dst.is_symlink():
        raise DestinationError(f"destination {dst} is a symbolic link; give the real directory path instead")
    if dst.exists() and not dst.is_dir():
        raise DestinationError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        if not force:
            raise DestinationError(f"destination {dst} is not empty; pass --force to replace a checkpoint "
                                   "qwen2q wrote there, or choose a new directory")
        ours, why = is_qwen2q_checkpoint(dst)
        if not ours:
            raise DestinationError(f"destination {dst} is not a qwen2q checkpoint ({why}); --force replaces "
                                   "only those: choose another directory, or empty this one yourself")
    parent = _existing_ancestor(dst.parent)
    if not os.access(parent, os.W_OK | os.X_OK) or _read_only_fs(parent):
        raise DestinationError(f"cannot write into {parent}: permission denied or read-only file system")


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def _read_only_fs(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextlib.contextmanager
def writing(what: Path | str):
    """Turn an OSError while writing `what` (disk full, read-only, permissions) into one DestinationError."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as e:
        raise DestinationError(f"cannot write {what}: {e.strerror or e}") from None
    except SafetensorError as e:  # "Error while serializing: I/O error: No space left on device (os error 28)"
        reason = str(e).rpartition("I/O error: ")[2] or str(e)
        raise DestinationError(f"cannot write {what}: {reason}") from None


class DestinationLock:
    """An exclusive, non-blocking lock on DST, held by one run at a time (rule 2 above).

    The lock file is unlinked on release; a run that opened the old file just before that notices that
    the path no longer names the file it locked and takes a fresh one, so two runs never both hold it.
    """

    def __init__(self, dst: Path):
        self.dst = dst
        self.path = dst.parent / f".{dst.name}.qwen2q-lock"
        self.fd: int | None = None

    def __enter__(self) -> "DestinationLock":
        with writing(self.dst.parent):
            self.dst.parent.mkdir(parents=True, exist_ok=True)
        while True:
            with writing(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise DestinationError(f"cannot lock {self.path}: {e.strerror}") from None
                holder = _read_text(self.path).strip() or "?"
                raise DestinationError(f"another qwen2q run (pid {holder}) is writing {self.dst}; wait for it to "
                                       "finish or choose another destination") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return self
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def partial_dir(dst: Path) -> Path:
    """The hidden directory a run builds DST's new contents in."""
    return dst.parent / f".{dst.name}.partial-{os.getpid()}"


def start_partial(dst: Path) -> Path:
    """Delete what killed runs into DST left behind (only directories marked as ours), then create and
    mark this run's partial directory.  Call with the lock held."""
    for old in dst.parent.glob(f".{dst.name}.partial-*"):
        if (old / PARTIAL_MARKER).is_file():
            shutil.rmtree(old, ignore_errors=True)
    for old in dst.parent.glob(f".{dst.name}.replaced-*"):
        if old.is_dir() and is_qwen2q_checkpoint(old)[0]:
            shutil.rmtree(old, ignore_errors=True)
    tmp = partial_dir(dst)
    with writing(tmp):
        tmp.mkdir()
        (tmp / PARTIAL_MARKER).write_text(f"{os.getpid()}\n")
    return tmp


def discard_partial(tmp: Path) -> None:
    """Delete this run's partial directory, if it is still there (it holds only what this run wrote)."""
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends, so a rename sequence is never cut in half; a signal
    that came meanwhile is delivered afterwards.  (A thread signal mask is not enough: the process's
    other threads would take the signal and Python would still interrupt the main thread.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


def install(tmp: Path, dst: Path, force: bool) -> None:
    """Move the finished checkpoint `tmp` to `dst` (rule 4 above).  Call with the lock held."""
    with _signals_deferred():
        aside = None
        if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
            _keep_and_fail(tmp, dst, "it became a file or link during the run")
        if dst.is_dir() and any(dst.iterdir()):
            ours, why = is_qwen2q_checkpoint(dst)
            if not force or not ours:
                _keep_and_fail(tmp, dst, "something was written into it during the run" if not force else why)
            aside = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
            with writing(dst):
                os.rename(dst, aside)
            ours, why = is_qwen2q_checkpoint(aside)
            if not ours:  # changed between the check and the rename: put it back untouched
                os.rename(aside, dst)
                _keep_and_fail(tmp, dst, why)
        try:
            (tmp / PARTIAL_MARKER).unlink()
            os.rename(tmp, dst)  # onto a missing or empty directory only; fails if DST gained files
        except OSError as e:
            if aside is not None:
                with contextlib.suppress(OSError):
                    os.rename(aside, dst)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                _keep_and_fail(tmp, dst, "something was written into it during the run")
            raise DestinationError(f"cannot move the new checkpoint to {dst}: {e.strerror}") from None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _keep_and_fail(tmp: Path, dst: Path, why: str) -> None:
    """Give the finished checkpoint a visible name beside DST and raise, naming both."""
    kept = dst.parent / f"{dst.name}.qwen2q-{os.getpid()}"
    (tmp / PARTIAL_MARKER).unlink(missing_ok=True)
    with writing(kept):
        os.rename(tmp, kept)
    raise DestinationError(f"left {dst} as it is ({why}); the new checkpoint is complete at {kept}")
