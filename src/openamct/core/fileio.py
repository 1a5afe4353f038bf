"""File output: atomic (a crash leaves the previous file or none, never half of one), and under
torch.distributed only from rank 0."""
import contextlib
import os
import secrets


def is_main_process() -> bool:
    """Rank 0 of the default process group (or of a torchrun launch not yet initialised), or no group at all."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds.

    The temporary file is created with the mode a plain open() gives (0o666 less the umask), so the renamed output
    is readable by whoever may read the folder. Its name carries the writer's process id: temporary files left by a
    process that was killed are removed by the next write into the same folder, and two runs writing into one
    folder never share a temporary file."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    _remove_orphans(directory)
    tmp = os.path.join(directory, f"{_TMP}{os.getpid()}-{secrets.token_hex(4)}-{os.path.basename(path)}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_TMP = ".openamct-tmp-"


def _remove_orphans(directory: str) -> None:
    """Remove the temporary files of writers that no longer run (killed before they could clean up)."""
    for name in os.listdir(directory):
        if not name.startswith(_TMP):
            continue
        pid = name[len(_TMP):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
