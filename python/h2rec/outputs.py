"""What h2rec may replace, and how: markers, output checks, locks, atomic swaps, fingerprints.

The contract (SPEC section 10):

- an output that exists is refused unless ``overwrite``;
- ``overwrite`` replaces only a folder h2rec wrote, recognised by its marker file
  :data:`MARKER` (or, for folders written before markers existed, by an h2rec ``meta.json``),
  of the same kind (a dataset never replaces a SID folder), and never a folder that holds an
  input of the command;
- a folder is locked while h2rec writes it: the lock is ``.<name>.lock`` beside it, held with
  ``flock`` (so a killed process releases it), and a second writer gets an error naming the
  holder;
- a new folder is written beside the old one under a hidden name and swapped in at the end
  (``renameat2(RENAME_EXCHANGE)`` where the file system has it, two renames otherwise, repaired
  by the next writer if a kill falls between them).

Item-id fingerprints tie embeddings, Semantic IDs and checkpoints to the dataset whose item ids
they were built for: the same ids in another order are another fingerprint.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from h2rec.errors import OutputError

logger = logging.getLogger(__name__)

MARKER = ".h2rec-output.json"
KINDS = ("dataset", "sids", "run", "export")

__all__ = [
    "KINDS",
    "MARKER",
    "OutputError",
    "check_output_dir",
    "check_output_file",
    "item_fingerprint",
    "locked",
    "marker_kind",
    "new_dir_beside",
    "recover",
    "swap_in",
    "write_marker",
]


# --------------------------------------------------------------------------- fingerprints


def item_fingerprint(item_ids: Sequence[str]) -> str:
    """SHA-256 of the ordered original item ids (row r = internal item r + 1)."""
    h = hashlib.sha256()
    h.update(json.dumps(list(item_ids), ensure_ascii=False).encode("utf8", "surrogatepass"))
    return h.hexdigest()


# --------------------------------------------------------------------------- markers


def write_marker(folder: Path, kind: str) -> None:
    """Mark ``folder`` as written by h2rec (kind: dataset, sids, run or export)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}")
    payload = {"format": "h2rec-output", "kind": kind, "version": 1, "id": uuid.uuid4().hex}
    (Path(folder) / MARKER).write_text(json.dumps(payload) + "\n", "utf8")


def _marker_id(folder: Path) -> str | None:
    try:
        mark = json.loads((Path(folder) / MARKER).read_text("utf8"))
    except (OSError, ValueError):
        return None
    return str(mark.get("id")) if isinstance(mark, dict) and mark.get("id") else None


def marker_kind(folder: Path) -> str | None:
    """The kind of h2rec output ``folder`` is, or None when h2rec did not write it."""
    folder = Path(folder)
    try:
        mark = json.loads((folder / MARKER).read_text("utf8"))
        if isinstance(mark, dict) and mark.get("kind") in KINDS:
            return str(mark["kind"])
    except (OSError, ValueError):
        pass
    # folders written before markers existed
    try:
        meta = json.loads((folder / "meta.json").read_text("utf8"))
        fmt = meta.get("format") if isinstance(meta, dict) else None
    except (OSError, ValueError):
        fmt = None
    if fmt == "h2rec-dataset":
        return "dataset"
    if fmt == "h2rec-sids":
        return "sids"
    if (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in ("last.pt", "best.pt", "metrics.json")
    ):
        return "run"
    return None


# --------------------------------------------------------------------------- checks


def _inside(path: Path, folder: Path) -> bool:
    try:
        p = Path(path).expanduser().resolve()
        f = Path(folder).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    return p == f or f in p.parents


def _first_input_inside(folder: Path, inputs: Iterable[str | Path | None]) -> Path | None:
    for inp in inputs:
        if inp is not None and str(inp) and _inside(Path(inp), folder):
            return Path(inp)
    return None


def check_output_dir(
    out: Path, kind: str, overwrite: bool, inputs: Iterable[str | Path | None] = ()
) -> None:
    """OutputError unless ``out`` may be written: absent, an empty folder, or (with
    ``overwrite``) an h2rec folder of the same kind that holds no input."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise OutputError(
            f"{out}: exists and is not a folder; h2rec writes a {kind} folder there only if "
            "nothing is in the way (remove it or choose another output)"
        )
    inp = _first_input_inside(out, inputs)
    if inp is not None:
        raise OutputError(
            f"{out}: holds the input {inp}; h2rec never replaces a folder holding one of its "
            "inputs (choose another output folder)"
        )
    try:
        empty = not any(out.iterdir())
    except OSError as err:
        raise OutputError(f"{out}: cannot list the folder ({err.strerror})") from err
    if empty:
        return
    found = marker_kind(out)
    if not overwrite:
        what = f"an h2rec {found} folder" if found else "a folder"
        raise OutputError(f"{out}: {what} already exists; pass --overwrite to replace it")
    if found is None:
        raise OutputError(
            f"{out}: exists and was not written by h2rec (no {MARKER}); --overwrite replaces "
            "only folders h2rec wrote (remove it yourself or choose another output)"
        )
    if found != kind:
        raise OutputError(
            f"{out}: is an h2rec {found} folder, not a {kind} folder; refusing to replace it "
            "(choose another output)"
        )


def check_output_file(
    out: Path, overwrite: bool, inputs: Iterable[str | Path | None] = (), flag: str = "--overwrite"
) -> None:
    """OutputError unless the file ``out`` may be written (absent, or a file with ``overwrite``
    that is not one of the inputs)."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name (e.g. {out / 'out'}...)")
    if not out.exists():
        return
    for inp in inputs:
        if inp is not None and str(inp) and _inside(Path(inp), out):
            raise OutputError(f"{out}: is an input of this command; choose another output")
    if not overwrite:
        raise OutputError(f"{out}: exists; pass {flag} to replace it")


# --------------------------------------------------------------------------- locks

_HELD: dict[str, int] = {}  # lock path -> depth, for this process


def _holder_text(raw: str) -> str:
    try:
        h = json.loads(raw)
        return (
            f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}: "
            f"{h.get('command', '')[:120]}"
        )
    except (ValueError, AttributeError):
        return "holder unknown"


@contextlib.contextmanager
def locked(folder: Path, what: str = "folder") -> Iterator[None]:
    """Hold the lock of ``folder`` (``.<name>.lock`` beside it, removed when released) for the
    block. Re-entrant within one process; a second process gets an OutputError naming the
    holder. ``flock`` locks die with their process, so a killed run never leaves a stale lock."""
    import fcntl

    folder = Path(folder)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    lock_path = parent / f".{folder.name}.lock"
    key = str(lock_path.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = -1
    for _ in range(100):  # the file may be removed by a holder finishing between open and lock
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raw = os.pread(fd, 4096, 0).decode("utf8", "replace")
            os.close(fd)
            raise OutputError(
                f"{folder}: the {what} is being written by another h2rec process "
                f"({_holder_text(raw)}); wait for it to finish or choose another name"
            ) from err
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
        fd = -1
    if fd < 0:
        raise OutputError(f"{lock_path}: could not take the lock")
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf8"), 0)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.unlink(lock_path)  # still holding it: a waiter re-checks the inode
    finally:
        os.close(fd)  # releases the flock


# --------------------------------------------------------------------------- atomic swap

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2; False when the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(e, os.strerror(e), str(b))


def _old_name(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def new_dir_beside(out: Path, kind: str) -> Path:
    """A fresh hidden folder beside ``out``, marked, to be swapped in by :func:`swap_in`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    write_marker(tmp, kind)
    return tmp


def _journal(out: Path) -> Path:
    return out.parent / f".{out.name}.swap"


def swap_in(new: Path, out: Path) -> None:
    """Make ``new`` (a finished, marked folder beside ``out``) the folder ``out``; remove the
    old one. A journal beside ``out`` names ``new`` until the old folder is gone, so that
    :func:`recover` finishes a swap a kill interrupted, whichever step it stopped at."""
    journal = _journal(out)
    journal.write_text(json.dumps({"new": str(new), "id": _marker_id(new)}) + "\n", "utf8")
    if out.exists() and _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # now holds the old content
    elif out.exists():
        old = _old_name(out)
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)
    journal.unlink(missing_ok=True)


def recover(out: Path) -> None:
    """Repair what a killed writer of ``out`` left (call with the lock held): finish or undo an
    interrupted swap, and remove h2rec's hidden temporary folders."""
    out = Path(out)
    old = _old_name(out)
    journal = _journal(out)
    if journal.exists():
        try:
            j = json.loads(journal.read_text("utf8"))
            new, want = Path(j["new"]), j.get("id")
        except (OSError, ValueError, KeyError, TypeError):
            new, want = None, None
        if want is not None and new is not None:
            if _marker_id(out) != want and new.is_dir() and _marker_id(new) == want:
                logger.warning("%s: finishing a replacement a killed process left", out)
                if not out.exists():
                    os.replace(new, out)
                else:
                    swap_in(new, out)
            elif new.is_dir() and _marker_id(new) != want:
                shutil.rmtree(new, ignore_errors=True)  # the old folder, swapped out
        journal.unlink(missing_ok=True)
    if old.is_dir() and marker_kind(old) is not None:
        if not out.exists():
            logger.warning("%s: restoring the folder an interrupted swap moved aside", out)
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)
    if out.parent.is_dir():
        for tmp in out.parent.glob(f".{out.name}.tmp-*"):
            if tmp.is_dir() and ((tmp / MARKER).exists() or not any(tmp.iterdir())):
                shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_files(path: Path) -> None:
    """Remove ``.<name>.tmp-<pid>...`` files beside ``path`` left by processes that died."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name[len(f".{path.name}.tmp-"):].split(".")[0]
        if stale.is_file() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def named(err: OSError, path: Path) -> OSError:
    """``err`` with ``path`` as its file name when it has none (numpy, polars and torch often
    raise a full disk without one)."""
    if err.filename is not None or err.errno is None:
        return err
    new = OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))
    new.__cause__ = err
    return new


def check_free_space(path: Path, err: BaseException) -> None:
    """Raise OSError(ENOSPC) from ``err`` when the file system of ``path`` is full: libraries
    such as torch report a full disk as a generic error ("unexpected pos ...")."""
    try:
        st = os.statvfs(Path(path).parent if not Path(path).is_dir() else path)
    except OSError:
        return
    if st.f_bavail * st.f_frsize < (1 << 20):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err

