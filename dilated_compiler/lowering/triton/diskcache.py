"""The on-disk cache of generated kernel modules (``@triton.jit`` needs its source in a real file).

* Location: ``$DILATED_COMPILER_CACHE_DIR`` or ``~/.cache/dilated_compiler``, subfolder ``triton/``.
* Name: a hash of the spec key, the specialisation, the generator's fingerprint and torch/triton versions.
* Writes are atomic (temporary file in the same folder, then ``os.replace``), so processes compiling the same
  plan at once each see either no file or a whole one; all write the same text.
* The last line is a checksum of the text above it; a file whose checksum fails (truncated, corrupt, edited)
  or whose text differs from the generator's is rewritten. The module runs from the generator's text, compiled
  in process: no bytecode is written or read beside the file.
* Autotuning results live beside it in ``autotune-<device>.json`` (see :mod:`.autotune`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
import types
from pathlib import Path

__all__ = ["cache_dir", "module_path", "load_module", "read_verified", "write_atomic", "CHECKSUM_PREFIX"]

CHECKSUM_PREFIX = "# dilated-compiler checksum sha256:"
_lock = threading.Lock()
_modules: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("DILATED_COMPILER_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "dilated_compiler"
    return base / "triton"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def with_checksum(text: str) -> str:
    if not text.endswith("\n"):
        text += "\n"
    return f"{text}{CHECKSUM_PREFIX}{_digest(text)}\n"


def read_verified(path: Path) -> str | None:
    """The file's text if its trailing checksum line matches, else None."""
    try:
        data = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    body, sep, last = data.rstrip("\n").rpartition("\n")
    if not sep or not last.startswith(CHECKSUM_PREFIX):
        return None
    body += "\n"
    return body if last[len(CHECKSUM_PREFIX):] == _digest(body) else None


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def module_path(key: str) -> Path:
    return cache_dir() / f"dc_{key}.py"


def load_module(key: str, text: str):
    """Import the generated module ``text`` from the disk cache under ``key``, (re)writing it when missing or
    not verified. Returns the module (one per key per process)."""
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        path = module_path(key)
        text = with_checksum(text)
        try:
            on_disk = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            on_disk = None
        if on_disk != text:
            try:
                write_atomic(path, text)
            except OSError as e:
                raise OSError(f"the Triton kernels are written to the disk cache before they are imported (Triton "
                              f"reads a kernel's source from its file), and {str(path.parent)!r} cannot be written: "
                              f"{e}. Set DILATED_COMPILER_CACHE_DIR to a writable folder.") from e
        # the text itself runs, compiled here: an import would read and write bytecode beside the file
        # (__pycache__), which no checksum covers. The file is what @triton.jit reads its kernels' source from.
        name = f"dilated_compiler_generated.dc_{key}"
        mod = types.ModuleType(name)
        mod.__file__ = str(path)
        sys.modules[name] = mod
        exec(compile(text, str(path), "exec"), mod.__dict__)
        _modules[key] = mod
        return mod
