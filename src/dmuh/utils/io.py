"""Crash-safe file writing: write to a temporary name in the same folder, then rename.

    atomic_path(path)       a temporary path beside `path` (".NAME.PID@HOST.RANDOM.tmp"); it replaces
                            `path` in one rename once the body succeeds
    atomic_write_text       the same for a string
    remove_orphans(folder)  delete the temporary files that writers killed mid-write (kill -9, a
                            power cut) left behind; every atomic write calls it for its folder
    refuse_overwrite        nothing is overwritten without --force, and no input of the command even with it
    file_lock               an advisory lock (fcntl) for a read-modify-write of a file or folder

A write that fails (disk full, quota, "file too large", permission, read-only file system, or a
torch / numpy / safetensors writer wrapping one of those) is a one-line DmuhError naming the target
file and the reason; the previous file, if any, is untouched and the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from dmuh.errors import DmuhError, first_line

TEMP_SUFFIX = ".tmp"
# Temporary files whose writer cannot be asked (no PID: written before dmuh recorded one; or
# written on another machine sharing the folder) are orphans once untouched this long.
ORPHAN_AGE_S = 3600.0
# ".NAME.PID@HOST.RANDOM.tmp": RANDOM is tempfile's 8 characters, NAME may hold dots itself.
_TEMP_WITH_PID = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)(?:@(?P<host>[A-Za-z0-9-]*))?\.[a-z0-9_]{8}\.tmp$")
_TEMP_WITHOUT_PID = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
# Words in a writer's own exception (torch's RuntimeError, safetensors' SafetensorError) that say
# it failed to write, not that the data could not be serialised.
_WRITE_FAILURE_WORDS = re.compile(
    r"i/o|io ?error|os error|errno|write|writing|written|stream|inline_container|unexpected pos|no space|quota|"
    r"too large|permission|read-only|disk",
    re.IGNORECASE,
)
# What a writer's message says when it names the error without an errno attribute.
_MESSAGE_ERRNOS = (
    (r"file too large|os error 27\b", errno.EFBIG),
    (r"no space left|os error 28\b", errno.ENOSPC),
    (r"quota exceeded|os error 122\b", errno.EDQUOT),
    (r"read-only file system|os error 30\b", errno.EROFS),
    (r"permission denied|os error 13\b", errno.EACCES),
)
_KEPT = "(the previous file, if any, is kept)"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    """This machine's name as it goes into temporary names: letters, digits and "-", at most 32."""
    return re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname().split(".")[0])[:32]


def temp_prefix(path: str | os.PathLike) -> str:
    """The start of a temporary name for `path` written by this process: ".NAME.PID@HOST."."""
    return f".{Path(path).name}.{os.getpid()}@{_host()}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    A crash or exception leaves any existing file at `path` untouched, and the temporary file is
    removed (a kill -9 leaves it, named with the writer's PID, for `remove_orphans`). A failed
    write (`OSError`, or a writer's exception wrapping one) becomes a DmuhError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DmuhError(
            f"cannot write {path}: cannot create its folder {path.parent} ({_reason_of_errno(error) or error}) {_KEPT}"
        ) from None
    remove_orphans(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as error:
        raise DmuhError(f"cannot write {path}: {_reason_of_errno(error) or first_line(error)} {_KEPT}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            # mkstemp makes the file private (0600); give it the mode a plain open() would have.
            os.chmod(tmp_path, 0o666 & ~_umask())
            _fsync(tmp_path)  # a quota or disk-full error some file systems report only here
            os.replace(tmp_path, path)
        except DmuhError:
            raise
        except Exception as error:
            reason = write_failure_reason(error, tmp_path)
            if reason is None:  # not a failed write (a bug in what is written): as it is
                raise
            raise DmuhError(f"cannot write {path}: {reason} {_KEPT}") from None
    finally:
        with contextlib.suppress(OSError):
            if tmp_path.exists():
                tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # a file system without fsync
            raise
    finally:
        os.close(fd)


# -- why a write failed -------------------------------------------------------------------------


def _reason_of_errno(error: BaseException) -> Optional[str]:
    """ "no space left on device" for an OSError with an errno; None without one."""
    code = getattr(error, "errno", None)
    if not isinstance(error, OSError) or not code:
        return None
    text = os.strerror(code)
    return text[:1].lower() + text[1:]


def _probe(tmp: Path) -> Optional[str]:
    """Why writing to `tmp` fails now, found by appending to it (a writer that reports a failed
    write without an errno: numpy's "N requested and M written", torch's "unexpected pos")."""
    block = b"\0" * (1 << 16)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND)
    except OSError as error:
        return _reason_of_errno(error)
    try:
        for _ in range(64):  # up to 4 MiB: past the slack of a partly filled block
            written = os.write(fd, block)
            if written < len(block):
                os.write(fd, block)  # a short write: the next one says why
        os.fsync(fd)
    except OSError as error:
        return _reason_of_errno(error)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return None


def write_failure_reason(error: BaseException, tmp: Optional[Path] = None) -> Optional[str]:
    """Why a write failed, in words ("no space left on device"), or None when `error` is not a
    failed write. An OSError always is; another exception (torch's RuntimeError, safetensors'
    SafetensorError) is when it wraps an OSError or its message says it failed to write."""
    seen: List[BaseException] = []
    link: Optional[BaseException] = error
    while link is not None and link not in seen:
        seen.append(link)
        reason = _reason_of_errno(link)
        if reason:
            return reason
        link = link.__cause__ or link.__context__
    message = first_line(error)
    if not isinstance(error, OSError) and not _WRITE_FAILURE_WORDS.search(message):
        return None
    for words, code in _MESSAGE_ERRNOS:
        if re.search(words, message, re.IGNORECASE):
            return _reason_of_errno(OSError(code, ""))
    probed = _probe(tmp) if tmp is not None else None
    return probed or f"write failed ({message[:160]})"


# -- temporary files left by killed writers -----------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True
    return True


def _started_after(pid: int, when: float) -> bool:
    """True when process `pid` started after `when` (so it reused the PID of a dead writer whose
    temporary file was last written at `when`); False when unknown (no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, counted after the ")" of the name
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK") > when + 1.0
    except (OSError, ValueError, IndexError, StopIteration):
        return False


def is_orphan(entry: Path, now: Optional[float] = None) -> bool:
    """Whether `entry` is a temporary file of `atomic_path` whose writer is gone: written on this
    machine by a PID that is not a live process (or by one that started after the file was last
    written: a reused PID); written elsewhere (another host sharing the folder) or without a PID,
    untouched for `ORPHAN_AGE_S`."""
    name = entry.name
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return False
    try:
        stat = entry.stat()
    except OSError:
        return False
    now = time.time() if now is None else now
    match = _TEMP_WITH_PID.match(name)
    if match and match["host"] in (None, _host()):  # a writer on this machine: is it alive?
        pid = int(match["pid"])
        if pid == os.getpid():
            return False
        return not _pid_alive(pid) or _started_after(pid, stat.st_mtime)
    if match or _TEMP_WITHOUT_PID.match(name):  # another machine's writer, or an old-style name
        return now - stat.st_mtime > ORPHAN_AGE_S
    return False


def remove_orphans(folder: str | os.PathLike) -> List[Path]:
    """Delete the temporary files in `folder` that a killed writer left (see `is_orphan`); the
    ones of live writers stay. Returns what was removed. Never raises: a folder that cannot be
    read or a file that cannot be removed is left as it is."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not entry.name.endswith(TEMP_SUFFIX) or not entry.name.startswith("."):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
        except OSError:
            continue
        path = Path(entry.path)
        if is_orphan(path, now):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


# -- --force ------------------------------------------------------------------------------------


def refuse_overwrite(path, force: bool, flag: str = "--out", inputs: Sequence[Tuple[str, Any]] = (), own=()) -> None:
    """Nothing is overwritten without --force: a DmuhError naming the flag when `path` exists.
    With `inputs` ((flag, path or data spec) of everything the command reads), an output that is
    one of them is refused even with --force (see `refuse_input_as_output`)."""
    if path and inputs:
        refuse_input_as_output(path, flag, inputs, own)
    if path and Path(path).exists() and not force:
        raise DmuhError(f"{flag} {path} already exists; pass --force to replace it")


# A data spec's scheme ("features:", "unlabeled:", "pairs:"): what follows it is the path read.
_SPEC_SCHEME = re.compile(r"^(?:[a-z][a-z0-9_+-]*:)+(?!//)")


def spec_path(spec) -> Optional[Path]:
    """The file or folder a path or data spec (`features:x.npz`, `unlabeled:photos/`) reads; None
    for none (an empty value, or a URL such as http://HOST:19530)."""
    if spec is None or spec == "":
        return None
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text):
        return None
    if not Path(text).exists():
        text = _SPEC_SCHEME.sub("", text, count=1)
    return Path(text) if text else None


def _same_file(a: Path, b: Path) -> bool:
    """Whether two existing paths are one file (a symbolic or hard link of the other included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_input_as_output(path, flag: str, inputs: Sequence[Tuple[str, Any]], own=()) -> None:
    """--force replaces an earlier output, never an input of the same command: a DmuhError when
    `path` (links followed) is one of `inputs`, or an existing file inside an input folder (a run
    directory, an image folder), other than `own` (the command's own outputs there: RUN/eval.json)."""
    out = Path(path)
    target = Path(os.path.realpath(out))
    owned = {Path(os.path.realpath(p)) for p in own}
    for input_flag, spec in inputs:
        where = spec_path(spec)
        if where is None or not where.exists():
            continue
        real = Path(os.path.realpath(where))
        if target == real or (out.exists() and _same_file(out, where)):
            raise DmuhError(
                f"{flag} {path} is the input of {input_flag} ({spec}); an output never replaces an input of its "
                "own command, even with --force: write elsewhere"
            )
        if real.is_dir() and target != real and real in target.parents and out.exists() and target not in owned:
            raise DmuhError(
                f"{flag} {path} is a file inside the input of {input_flag} ({spec}); an output never replaces an "
                "input of its own command, even with --force: write elsewhere"
            )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_record(path: Path, record_format: str, version: int, what: str, missing: str = "") -> Dict[str, Any]:
    """A JSON object dmuh wrote (split.json, label_noise.json, a shards manifest), checked to carry
    its "format" and "version"; a one-line DmuhError naming the file otherwise (`missing`: a hint
    added when the file is not there)."""

    try:
        record = parse_json(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DmuhError(f"{path}: {what} not found{f' ({missing})' if missing else ''}") from None
    except OSError as error:
        raise DmuhError(f"{path}: cannot read {what} ({error.strerror or error})") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise DmuhError(f"{path}: corrupt {what} ({first_line(error)})") from None
    if not isinstance(record, dict) or record.get("format") != record_format:
        raise DmuhError(f"{path}: not a dmuh {what}")
    if record.get("version") != version:
        raise DmuhError(f"{path}: {what} format version {record.get('version')!r}, this dmuh reads {version}")
    return record


def index_list(record: Dict[str, Any], key: str, path):
    """Field `key` of a JSON record: a list of non-negative integers, as int64."""
    import numpy as np

    values = record.get(key)
    if not isinstance(values, list) or not all(type(v) is int and 0 <= v < 2**63 for v in values):
        raise DmuhError(f"{path}: field {key!r} must be a list of non-negative integers")
    return np.array(values, dtype=np.int64)


# -- advisory locks: one writer at a time ---------------------------------------------------------

LOCK_SUFFIX = ".lock"
LOCK_POLL_S = 0.1


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of `path` (a file or a folder): ".NAME.lock" beside it."""
    path = Path(os.path.abspath(path))
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str, wait_s: Optional[float] = None) -> Iterator[None]:
    """Hold an exclusive advisory lock (fcntl.flock) on `path` (an index, a run directory) for a
    read-modify-write. A second writer waits up to `wait_s` seconds (None: refuses at once) and
    then refuses with a one-line DmuhError. The lock file ".NAME.lock" beside `path` is removed on
    release; a writer that locked a lock file another one removed meanwhile tries again."""
    import fcntl

    target = lock_path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DmuhError(f"cannot lock {what} {path}: {_reason_of_errno(error) or error}") from None
    deadline = time.monotonic() + (wait_s or 0.0)
    while True:
        try:
            fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as error:
            raise DmuhError(f"cannot lock {what} {path}: {_reason_of_errno(error) or error}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DmuhError(f"cannot lock {what} {path}: {_reason_of_errno(error) or error}") from None
            if time.monotonic() >= deadline:
                holder = ""
                with contextlib.suppress(OSError, ValueError):
                    holder = f" (process {int(target.read_text().strip())})"
                waited = f" after waiting {wait_s:g} s" if wait_s else ""
                raise DmuhError(
                    f"{what} {path} is being written by another dmuh{holder}{waited}; wait for it to finish "
                    "and try again"
                ) from None
            time.sleep(LOCK_POLL_S)
            continue
        try:  # the lock file may have been removed (and made again) by the writer that held it
            same = os.fstat(fd).st_ino == os.stat(target).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(target)
        os.close(fd)  # closing releases the lock


# -- reading arrays without amplification ---------------------------------------------------------

# A deflated .npz member may inflate to at most this many times its stored size once it is larger
# than ARRAY_RATIO_FREE bytes: real data (codes, features, images) deflates a few times at most; a
# ratio of hundreds is a zip bomb (zeros), which would take memory far beyond the file's size.
ARRAY_MAX_RATIO = 100
ARRAY_RATIO_FREE = 64 << 20


def memory_budget() -> int:
    """Bytes one array may take: half of the memory available now (MemAvailable; all of the
    machine's memory where /proc is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def _npy_payload(stream, name: str) -> int:
    """The bytes of data an .npy header declares (its shape times its item size); ValueError when
    the header is not one numpy reads without pickle."""
    import numpy as np

    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"{name}: .npy format version {version}")
    if dtype.hasobject:
        raise ValueError(f"{name}: holds Python objects (a pickle), which dmuh does not read")
    count = 1
    for extent in shape:
        count *= int(extent)
    return count * dtype.itemsize


def check_array_file(path, what: str, problem: str = "cannot read") -> None:
    """Refuse (a one-line DmuhError naming `path`) an .npy or .npz file whose arrays would take
    more memory than its size justifies, before numpy reads it: every member's declared size (the
    zip directory) within `memory_budget`, a deflate ratio within ARRAY_MAX_RATIO, and each .npy
    header's shape agreeing with the bytes stored (numpy allocates what the header says first)."""
    path = Path(path)
    budget = memory_budget()
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
            if magic == b"\x93NUMPY":
                handle.seek(0)
                stored = path.stat().st_size
                payload = _npy_payload(handle, path.name)
                if payload > stored - handle.tell():
                    raise ValueError(f"its header declares {payload:,} bytes of data, the file holds fewer")
                return
        if magic[:2] != b"PK":
            return  # not an array file: the reader says what it is
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename
                if info.file_size > budget:
                    raise ValueError(f"member {name} declares {info.file_size:,} bytes, beyond the memory available")
                if info.file_size > ARRAY_RATIO_FREE and info.file_size > ARRAY_MAX_RATIO * max(info.compress_size, 1):
                    raise ValueError(
                        f"member {name} inflates {info.file_size // max(info.compress_size, 1):,} times "
                        f"(to {info.file_size:,} bytes): a zip bomb, not data"
                    )
                if name.endswith(".npy"):
                    try:
                        with archive.open(info) as member:
                            payload = _npy_payload(member, name)
                            if payload > info.file_size - member.tell():
                                raise ValueError(f"its header declares {payload:,} bytes, it holds fewer")
                    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
                        key = name[: -len(".npy")]
                        where = (
                            f"cannot read key {key!r}" if problem == "cannot read" else f"{problem} {what}, key {key!r}"
                        )
                        raise DmuhError(f"{path}: {where} ({first_line(error, 200)})") from None
    except DmuhError:
        raise
    except (
        OSError,
        ValueError,
        EOFError,
        RuntimeError,
        OverflowError,
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
    ) as error:
        raise DmuhError(f"{path}: {problem} {what} ({first_line(error, 200)})") from None


# -- reading JSON without amplification -----------------------------------------------------------

JSON_MAX_DEPTH = 64  # dmuh's own JSON (headers, records, requests) nests a few levels


def parse_json(text) -> Any:
    """json.loads, bounded: nesting deeper than JSON_MAX_DEPTH (which would exhaust the parser's
    recursion) and integers of thousands of digits are a ValueError like any malformed JSON."""
    import json

    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {JSON_MAX_DEPTH} levels") from None
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > JSON_MAX_DEPTH:
            raise ValueError(f"JSON nested deeper than {JSON_MAX_DEPTH} levels")
        if isinstance(node, dict):
            pending.extend((child, depth + 1) for child in node.values() if isinstance(child, (dict, list)))
        elif isinstance(node, list):
            pending.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))
    return value
