"""What every module shares: the errors the command line reports as one line, wall time per stage, atomic file
writes and the process's rank under torchrun. Data, training, export, deploy and report have modules of their own."""
import contextlib
import fcntl
import io
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist


# Every failure the command line reports as one line "error: ...", with its exit code (README: exit codes).
class UserError(Exception):
    """A problem with the user's input."""
    exit_code = 2


class RunError(Exception):
    """A stage that failed during the run, not because of the input (an exporter, a runtime, an observer)."""
    exit_code = 1


class Diverged(RunError):
    """Non-finite or exploding loss, weights or quantization parameters."""
    exit_code = 3


class WriteError(RunError):
    """An output file could not be written (no space, no permission, folder gone)."""
    exit_code = 4


class PeerFailed(RunError):
    """Under torchrun: a collective failed because another process of the job stopped (crash, kill, error)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, CI runners, docker stop, Kubernetes): handled like Ctrl-C, exit code 143."""

    @staticmethod
    def handler(signum, frame):  # signal.signal(signal.SIGTERM, Terminated.handler)
        raise Terminated()


class Stages:
    """Wall time per stage; a stage that fails with an unexpected exception becomes a RunError naming it.

        stages = Stages()
        with stages("fp32_train"):
            ...
    """

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        except (UserError, RunError, KeyboardInterrupt):
            raise
        except Exception as e:
            message = (str(e).strip().splitlines() or [""])[0][:300]
            if dist.is_available() and dist.is_initialized() and (
                    isinstance(e, dist.DistError) or "closed by peer" in message or "reset by peer" in message):
                raise PeerFailed(f"stage {name}: another process of this torchrun job stopped ({message})") from e
            raise RunError(f"stage {name} failed: {type(e).__name__}: {message}") from e
        self.seconds[name] = time.perf_counter() - start


# ---------------------------------------------------------------- files

def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, then rename it over path.

    Readers never see half a file, and a failed write leaves the earlier file as it was. Writers get a Python file
    object so that a full disk is an OSError here (torch.jit.save to a path aborts the process instead).
    """
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        with open(tmp, "wb") as f:  # a named file: onnx.save looks at f.name
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary files
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"cannot write '{path}': {e.strerror or e}") from e
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def save_json(obj, path):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_text(text, path):
    atomic_write(path, lambda f: f.write(text.encode()))


def torch_save(obj, path):
    """torch.save (torch.jit.save for TorchScript) into memory, then atomic_write: torch's zip writer turns a
    full disk into an opaque RuntimeError, or aborts, so it never writes to the file itself."""
    buffer = io.BytesIO()
    (torch.jit.save if isinstance(obj, torch.jit.ScriptModule) else torch.save)(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


@contextlib.contextmanager
def exclusive_folder(folder):
    """Hold an exclusive lock on folder (made when missing) for the block: one run per output folder.

    flock on the folder itself, so that nothing is written into it, and the OS releases the lock when the process
    ends, so that a killed run leaves none behind. Another holder is a UserError naming its process. Folders made
    here are removed again when the block leaves them empty (a run that failed before writing anything)."""
    folder = Path(folder)
    while True:
        made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise WriteError(f"cannot make '{folder}': {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd)
            os.close(fd)
            raise UserError(f"'{folder}' is in use by another run ({holder}); wait for it to end or choose another "
                            f"--out-dir") from None
        except OSError as e:  # a file system without flock (some network mounts): say so, and go on
            print(f"warning: cannot lock '{folder}' ({e.strerror or e}): nothing stops a second run from writing "
                  f"into it")
            break
        # a run that removed its empty folder between our open and flock leaves us a lock on a deleted inode
        try:
            if os.path.samestat(os.stat(folder), os.fstat(fd)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield folder
    finally:
        for p in made:  # still locked here, so no other run has written into them
            try:
                p.rmdir()
            except OSError:  # not empty: the run wrote something
                break
        os.close(fd)


def lock_holder(fd):
    """'process PID (its command line)' holding a flock on the file fd is open on, read from /proc/locks."""
    st = os.fstat(fd)
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
                continue  # a waiter, or another kind of lock
            major, minor, inode = fields[5].split(":")
            if (int(inode), int(major, 16), int(minor, 16)) == (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)):
                pid = fields[4]
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return f"process {pid}: {' '.join(command.split())[:200]}"
    except (OSError, ValueError):
        pass
    return "process unknown"


# ---------------------------------------------------------------- torchrun

def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
