"""File output that never leaves a half-written or half-committed result behind.

``check_output_paths`` validates every output before any slow work (one message per problem);
``commit_outputs`` writes several files as one transaction: each to a temporary file beside its target,
then all renamed into place; if any step fails, what this run wrote is removed and files it replaced are
restored. Symlinks are written through to their target, new files get the umask's mode (a replaced file
keeps its own), and existing paths that are not regular files (directories, device nodes, FIFOs) are
refused.

Temporaries are hidden names beside their target that carry the writing process's id
(``.ranks.json.sensilora-<pid>-<random>.tmp``, ``.bak``, ``.staging``). A run killed outright (SIGKILL, a
lost node) cannot remove its own; the next write to the same target removes those of processes no longer
alive, and puts back a file such a run had moved aside but not yet replaced (``clean_stale_temporaries``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import SensiloraError

Writer = Callable[[Path], None]  # writes the content to the path it is given


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


TEMPORARY = re.compile(r"\.(?P<target>.+)\.sensilora-(?P<pid>\d+)-[^.]+\.(?P<kind>tmp|bak|staging)")


def temporary_path(target: Path, kind: str, directory: bool = False) -> Path:
    """A new, empty hidden temporary beside ``target`` named for this process (``kind``: tmp, bak, staging)."""
    prefix, suffix = f".{target.name}.sensilora-{os.getpid()}-", f".{kind}"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    os.close(fd)
    return Path(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temporaries(target: Path) -> None:
    """Remove the temporaries that dead sensilora processes left beside ``target``; a ``.bak`` of a target
    that is missing is the original that run had moved aside: it is put back."""
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        match = TEMPORARY.fullmatch(entry.name)
        if not match or match["target"] != target.name or _alive(int(match["pid"])):
            continue
        if match["kind"] == "bak" and not os.path.lexists(target):
            os.replace(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def resolve_output(path: str | os.PathLike, label: str = "output") -> Path:
    """The real file ``path`` will write (symlinks followed), after checking that it can be written."""
    target = Path(os.path.realpath(path))
    if target.exists():
        mode = target.stat().st_mode
        if stat.S_ISDIR(mode):
            raise SensiloraError(f"{label} path {path} is a directory; give a file path")
        if not stat.S_ISREG(mode):
            raise SensiloraError(
                f"{label} path {path} is not a regular file (a device, FIFO or socket); give a file path"
            )
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SensiloraError(f"{label} path {path} cannot be created: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SensiloraError(f"{label} path {path} cannot be written: {ancestor} is not writable")
    return target


def check_output_paths(paths: dict[str, str | os.PathLike | None]) -> dict[str, Path]:
    """``{label: path}`` (None entries skipped) -> resolved targets; refuses two labels on one file."""
    resolved = {label: resolve_output(path, label) for label, path in paths.items() if path is not None}
    seen: dict[Path, str] = {}
    for label, target in resolved.items():
        if target in seen:
            raise SensiloraError(
                f"the {seen[target]} and {label} paths are the same file ({target}); give distinct paths"
            )
        seen[target] = label
    return resolved


def create_parents(target: Path, created: list[Path]) -> None:
    """Create the missing directories above ``target``, appending each to ``created`` (outermost first)."""
    missing = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir()
        created.append(directory)


def remove_created(created: list[Path]) -> None:
    """Undo ``create_parents``: remove the directories it made that are still empty, innermost first."""
    for directory in reversed(created):
        if directory.exists() and not any(directory.iterdir()):
            directory.rmdir()


def commit_outputs(writers: dict[str | os.PathLike, Writer]) -> None:
    """Write every ``{path: writer}`` entry, all or nothing (see the module docstring)."""
    staged: list[tuple[Path, Path]] = []  # (temporary, target)
    created_dirs: list[Path] = []
    committed: list[list] = []  # [target, backup of what it replaced or None, whether the original was moved]
    current = None
    try:
        for path, writer in writers.items():
            current = path
            target = resolve_output(path)
            create_parents(target, created_dirs)
            clean_stale_temporaries(target)
            temporary = temporary_path(target, "tmp")
            staged.append((temporary, target))
            writer(temporary)
            os.chmod(temporary, stat.S_IMODE(target.stat().st_mode) if target.exists() else _umask_mode())
        for temporary, target in staged:
            record = [target, None, False]
            committed.append(record)
            if target.exists():
                record[1] = temporary_path(target, "bak")
                os.replace(target, record[1])
                record[2] = True
            os.replace(temporary, target)
    except BaseException as error:
        for target, backup, moved in reversed(committed):
            if moved:
                os.replace(backup, target)
            elif backup is not None:
                backup.unlink(missing_ok=True)
            elif target.exists():
                target.unlink()
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        remove_created(created_dirs)
        if isinstance(error, SensiloraError) or not isinstance(error, Exception):
            raise
        # a full disk or a read-only directory (OSError), or a writer's own error type (safetensors')
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SensiloraError(f"writing {current} failed ({reason}); nothing was written") from None
    for _, backup, _ in committed:
        if backup is not None:
            backup.unlink(missing_ok=True)


def write_with_atomic(path: str | os.PathLike, writer: Writer) -> None:
    """Call ``writer(tmp_path)`` and move the result into place only if it returns."""
    commit_outputs({path: writer})


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_with_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_tagged_safetensors(path: str | os.PathLike, fmt: str, what: str, remedy: str) -> tuple[dict, dict]:
    """(JSON header under the ``sensilora`` metadata key, {name: tensor}) of a file we wrote in format
    ``fmt``; one-line refusals for an unreadable file, foreign metadata or another format. ``what`` names
    the file's kind in messages ("statistics file"), ``remedy`` says what to do about an unreadable one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own types (not OSError) for missing or damaged files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SensiloraError(f"cannot read {what} {path}: {reason}; {remedy}") from None
    try:
        header = json.loads(metadata["sensilora"])
    except (KeyError, ValueError, RecursionError):
        raise SensiloraError(f"{path} is a safetensors file but not a sensilora {what} (no readable header)") from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        found = header.get("format") if isinstance(header, dict) else None
        raise SensiloraError(f"{path} is not a sensilora {what} of format {fmt} (found {found!r})")
    return header, tensors
