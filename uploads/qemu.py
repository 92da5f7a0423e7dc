"""qemu-img, run safely: forced to a format, under CPU and memory limits, alone with the file.

No Django here. `qemu_img_info()` and `qemu_img_check()` give the second opinion
uploads/diskimage.py asks for; `convert_to_qcow2()` turns a file that passed into QCOW2, with
progress. Each run is alone with the file in a private folder (`_alone`) and limited as Glance
limits it (prlimit), so that a parser bug fed a hostile file can neither open other files nor
eat the host.
"""

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from uploads.errors import HINT_EXPORT_AGAIN, InspectError, gettext_noop

GiB = 1024**3


@dataclass(frozen=True)
class Limits:
    """Resource limits for one qemu-img run: a parser bug fed a hostile file must not eat the host."""

    cpu_seconds: int
    address_space: int  # bytes of virtual memory
    timeout: float | None  # wall-clock seconds; None waits as long as it takes


# Glance and Nova run `qemu-img info` with 1 GiB of address space; reading headers needs < 1 s CPU.
INFO_LIMITS = Limits(cpu_seconds=10, address_space=1 * GiB, timeout=60)
# Converting is real work (CPU time grows with the data: bench/README.md) but never needs much memory.
CONVERT_LIMITS = Limits(cpu_seconds=4 * 3600, address_space=1 * GiB, timeout=None)

# The portal's format names (uploads/diskformats.py) as qemu-img's -f takes them.
QEMU_DRIVERS = {
    "qcow2": "qcow2", "qcow": "qcow", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx",
    "vdi": "vdi", "qed": "qed", "raw": "raw", "iso": "raw",
}
# Formats `qemu-img check` can verify (it finds clusters past the end of a truncated file).
QEMU_CHECKABLE = ("qcow2", "qed", "vdi", "vhdx", "vmdk")


class QemuImgFailed(InspectError):
    """qemu-img ran but refused the file (or was stopped by its limits)."""

    def __init__(self, message: str, *, detail: str):
        super().__init__(message, detail=detail, permanent=True)


# ---------------------------------------------------------------------------------------------
# qemu-img alone with the file


@dataclass(frozen=True)
class _Alone:
    """Where qemu-img runs: `folder` (its working directory) holds nothing but the file."""

    folder: str
    path: str  # the file, as qemu-img is to name it
    pass_fds: tuple[int, ...] = ()


PRIVATE_PREFIX = ".qemu-img-"
ABANDONED_AFTER_SECONDS = 60  # a new private folder is locked within microseconds


@contextlib.contextmanager
def _opened(target, fmt: str) -> Iterator[tuple[_Alone, list[str]]]:
    """Where qemu-img runs and the arguments that name the image, forced to `fmt`: a local
    file alone in a private folder (_alone), or an image served over NBD (uploads/nbd.py's
    Export) from the private folder that holds only its socket, with backing files switched
    off in the options themselves ("backing": null)."""
    if not hasattr(target, "socket_path"):
        with _alone(target) as alone:
            yield alone, ["-f", QEMU_DRIVERS[fmt], alone.path]
        return
    spec = {"driver": QEMU_DRIVERS[fmt], "backing": None,
            "file": {"driver": "nbd", "server": {"type": "unix", "path": target.socket_path}}}
    yield _Alone(os.path.dirname(target.socket_path), target.socket_path), ["json:" + json.dumps(spec)]


@contextlib.contextmanager
def _alone(path: str | os.PathLike) -> Iterator[_Alone]:
    """A fresh private folder beside the file, holding only a hard link to it named "disk".

    qemu-img resolves a relative name in an image (a backing file, an extent) against the
    image's own folder: next to a staged file, that is other people's uploads. Here it finds
    nothing, even if our checks missed the name. Where hard links are not possible, qemu-img
    gets the file as /proc/self/fd/N of a descriptor it inherits, and the folder stays empty.
    The folder is removed afterwards, with anything qemu-img left in it.
    """
    path = os.path.abspath(path)
    _remove_abandoned(os.path.dirname(path))
    folder = tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=os.path.dirname(path))
    lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while in use: see _remove_abandoned
        link = os.path.join(folder, "disk")
        try:
            os.link(path, link)
            linked = True
        except OSError:  # a file system without hard links (or not ours to link)
            linked = False
        if linked:
            yield _Alone(folder, link)
        else:
            with open(path, "rb") as f:
                yield _Alone(folder, f"/proc/self/fd/{f.fileno()}", (f.fileno(),))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)


def _remove_abandoned(parent: str) -> None:
    """Remove the private folders of processes that died in a run (a worker killed mid-way):
    each holds a link to a staged file and perhaps half a conversion. A folder in use is locked
    (flock: the kernel releases it when its process dies, in any container on this disk)."""
    now = time.time()
    for entry in os.scandir(parent):
        if not entry.name.startswith(PRIVATE_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < ABANDONED_AFTER_SECONDS:
                continue  # perhaps created a moment ago and not locked yet
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # removed meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(entry.path, ignore_errors=True)
        except BlockingIOError:
            pass  # in use
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# qemu-img under limits


def _limited(cmd: list[str], limits: Limits) -> list[str]:
    """cmd run under prlimit: CPU seconds and address space, as Glance's ProcessLimits do."""
    for program in ("prlimit", cmd[0]):
        # Checked here: prlimit itself would only answer "failed to execute" with exit 1,
        # which would read as qemu-img refusing the file.
        if shutil.which(program) is None:
            raise InspectError(
                gettext_noop("The portal cannot check disk images right now."),
                hint=gettext_noop("Ask an administrator: qemu-img (Debian's qemu-utils) and prlimit must be installed."),
                detail=f"{program} not found", permanent=True,
            )
    program = os.path.abspath(shutil.which(cmd[0]))  # it runs in another working directory
    return ["prlimit", f"--cpu={limits.cpu_seconds}", f"--as={limits.address_space}", "--", program, *cmd[1:]]


def _run_limited(cmd: list[str], limits: Limits, alone: _Alone) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            _limited(cmd, limits), capture_output=True, text=True, errors="replace",
            timeout=limits.timeout, env=_qemu_env(), stdin=subprocess.DEVNULL,
            cwd=alone.folder, pass_fds=alone.pass_fds,
        )
    except subprocess.TimeoutExpired:
        raise InspectError(
            gettext_noop("Checking the disk image took too long."),
            hint=gettext_noop("The portal tries again later."),
            detail=f"{' '.join(cmd[:3])} did not finish within {limits.timeout} s",
        ) from None


def _qemu_env() -> dict[str, str]:
    # C locale: qemu-img's messages are matched in English. One malloc arena: glibc reserves 64 MiB
    # of address space for each thread's own arena, and qemu-img starts more I/O threads when the
    # machine is busy, until the address-space limit makes it abort ("qemu_thread_create: Resource
    # temporarily unavailable", which read as a damaged file, or "failed to allocate memory for
    # stack" in a conversion).
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "MALLOC_ARENA_MAX": "1"}


def last_lines(text: str, n: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-n:]) or "(no message)"


def qemu_img_info(
    path, fmt: str, *, qemu_img: str = "qemu-img", limits: Limits = INFO_LIMITS
) -> dict:
    """`qemu-img info -f <driver> --output=json --force-share` under limits; fmt is a portal name;
    `path` a local file or an nbd.Export.

    The format is always forced: letting qemu-img guess is what made backing-file attacks possible.
    qemu-img info does not open backing files, and runs alone with the file (_opened).
    Raises QemuImgFailed when it refuses the file.
    """
    with _opened(path, fmt) as (alone, image):
        cmd = [qemu_img, "info", "--output=json", "--force-share", *image]
        proc = _run_limited(cmd, limits, alone)
    if proc.returncode != 0:
        raise QemuImgFailed(
            "qemu-img could not read the file.",
            detail=f"exit {proc.returncode}{_limit_note(proc.returncode)}: {last_lines(proc.stderr)}",
        )
    return json.loads(proc.stdout)


def qemu_img_check(
    path, fmt: str, *, qemu_img: str = "qemu-img", limits: Limits = INFO_LIMITS
) -> subprocess.CompletedProcess:
    """`qemu-img check -f <driver> --output=json --force-share` under limits, alone with the file
    (or an nbd.Export): it reads the format's tables and finds data that points past the end.
    Unlike `info`, `check` opens a backing file if there is one (but over NBD, where the options
    forbid it): run it only on a file whose own checks passed."""
    with _opened(path, fmt) as (alone, image):
        cmd = [qemu_img, "check", "--force-share", "--output=json", *image]
        return _run_limited(cmd, limits, alone)


def _limit_note(returncode: int) -> str:
    # The kernel ends a process over its CPU limit with SIGXCPU (24), then SIGKILL (9).
    return " (stopped by its CPU limit)" if returncode in (-24, -9) else ""


# ---------------------------------------------------------------------------------------------
# convert_to_qcow2


def convert_to_qcow2(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    src_format: str,
    virtual_size: int,
    qemu_img: str = "qemu-img",
    limits: Limits = CONVERT_LIMITS,
    on_progress: Callable[[float], None] | None = None,
) -> None:
    """Convert an inspected, safe file to QCOW2 at dst (only there once it is complete).

    Only call this for a file inspect_file() passed: the source format is forced, never guessed.
    on_progress(percent) is called as qemu-img reports progress (0.0 .. 100.0).
    Raises InspectError: not enough free space (retryable), qemu-img failed (permanent).
    """
    if src_format not in QEMU_DRIVERS:  # the pass-through formats (zvhd, zvhd2) among them
        raise ValueError(f"qemu-img cannot convert {src_format!r}")
    dst = os.fspath(dst)
    _remove(dst)
    with _alone(src) as alone:  # the QCOW2 is written in the private folder too, then moved
        _check_free_space(alone.folder, virtual_size)
        cmd = [
            qemu_img, "convert", "-p", "--force-share", "-f", QEMU_DRIVERS[src_format],
            "-O", "qcow2", "-o", "compat=1.1", alone.path, "converted.qcow2",
        ]
        returncode, stderr = _run_with_progress(cmd, limits, on_progress, alone)
        if returncode == 0:
            try:
                shutil.move(os.path.join(alone.folder, "converted.qcow2"), dst)
            except BaseException:
                _remove(dst)  # a copy to another file system stopped half-way
                raise
    if returncode != 0:
        if "no space left" in stderr.lower():
            raise InspectError(
                gettext_noop("The server ran out of disk space while converting the image."),
                hint=gettext_noop("The portal tries again later; if it keeps failing, ask an administrator."),
                detail=last_lines(stderr),
            )
        raise InspectError(
            gettext_noop("The disk image could not be converted to QCOW2."),
            hint=HINT_EXPORT_AGAIN,
            detail=f"qemu-img convert exit {returncode}{_limit_note(returncode)}: {last_lines(stderr)}",
            permanent=True,
        )


def _check_free_space(folder: str, virtual_size: int) -> None:
    # A QCOW2 holds at most the virtual size plus a little metadata; 64 MiB covers that to 1 TB.
    needed = virtual_size + 64 * 1024**2
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise InspectError(
            gettext_noop("There is not enough free disk space on the server to convert this image."),
            hint=gettext_noop("The portal tries again later; if it keeps failing, ask an administrator."),
            detail=f"converting needs up to {needed} bytes in {folder}, {free} are free",
        )


def _run_with_progress(cmd: list[str], limits: Limits, on_progress, alone: _Alone) -> tuple[int, str]:
    """Run qemu-img -p under limits, passing each "(12.34/100%)" it prints to on_progress."""
    limited = _limited(cmd, limits)
    # stderr goes to a file: a pipe nobody reads while we follow stdout could fill and stall.
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            limited, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL, env=_qemu_env(),
            cwd=alone.folder, pass_fds=alone.pass_fds,
        )
        try:
            _follow_progress(proc.stdout, on_progress)
            proc.wait(timeout=limits.timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        errors.seek(0)
        return proc.returncode, errors.read().decode("utf-8", "replace")


def _follow_progress(stdout, on_progress) -> None:
    """qemu-img rewrites one line with "\\r": "    (45.00/100%)"."""
    pending = b""
    while chunk := stdout.read1(4096):
        pending += chunk
        *done, pending = pending.split(b"\r")
        for piece in done:
            text = piece.strip().strip(b"()").split(b"/")[0]
            if on_progress is not None and text:
                try:
                    on_progress(float(text))
                except ValueError:
                    pass  # not a progress line


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass

