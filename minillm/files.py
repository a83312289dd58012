"""Reading and writing the package's files safely: saves that a full disk cannot half-do, clear read errors.

Used by every save and load in the package: `save_pretrained` / `from_pretrained` (chapter 06),
`BPETokenizer.save` / `load` (chapter 04), `save_adapter` / `load_adapter` (chapter 09).

Why a save needs care: writing a file in place first empties it. If the disk fills up, the process is killed
or the power fails halfway, the old file is gone and the new one is cut off, so nothing loads any more. The
cure is the one databases and editors use: write the new content under a temporary name beside the target,
flush it to the disk, then rename it over the target with `os.replace`. Within one file system a rename is
atomic, so a reader sees the old file or the new one, never a mixture.
"""

import json
import os
import uuid
from pathlib import Path


def write_files_atomically(contents: dict) -> None:
    """Write each `{path: str or bytes}` so that an interrupted save leaves the files already there whole.

    Every file is first written in full to a temporary name in its own folder; only when all of them are
    written are they renamed over their targets, in the order given. Put the file that says what a folder
    holds (config.json) last: the renames take microseconds, and a crash between two of them leaves at worst
    new weights beside the old config, which the loaders reject with a clear error, rather than a cut-off file.
    A failed write (a full disk: ENOSPC, or a file-size limit: EFBIG) raises OSError naming the file, after
    removing the temporary files. Strings are written as UTF-8.
    """
    staged = []  # (temporary path, target path), in the order given
    try:
        for target, content in contents.items():
            target = Path(target)
            temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
            staged.append((temporary, target))
            _write_durably(temporary, content.encode("utf-8") if isinstance(content, str) else content)
    except BaseException as err:  # also Ctrl-C: leave no temporary files behind
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"could not write {target} ({err.strerror}); nothing was replaced, so the "
                                     f"files already in {target.parent} are as they were") from err
        raise
    for temporary, target in staged:
        os.replace(temporary, target)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as file:  # "x": a fresh file; never write into someone else's
        file.write(data)
        file.flush()
        os.fsync(file.fileno())  # on the disk before the rename, or a power cut could leave an empty file


def read_json(path, caller: str, expected: str):
    """The JSON value stored in `path`; ValueError naming the file when it is not UTF-8 JSON.

    `caller` starts the message ("from_pretrained"), `expected` says what file belongs there.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{caller}: {path} is not valid UTF-8 JSON ({err}); expected {expected}") from None


def read_json_object(path, caller: str, expected: str) -> dict:
    """`read_json` for files that must hold one JSON object (a config): ValueError otherwise."""
    value = read_json(path, caller, expected)
    if not isinstance(value, dict):
        raise ValueError(f"{caller}: {path} must hold a JSON object, got a {type(value).__name__}; "
                         f"expected {expected}")
    return value
