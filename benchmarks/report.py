"""The command line and the markdown output the small benchmark scripts share."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def command() -> str:
    """How this script was called, as a reader would retype it from the repository root."""
    return f"python {' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}"


def malloc_line() -> str:
    """The allocator's settings, which move the CPU kernels' times more than float ones': glibc's tunables where
    set."""
    tunables = os.environ.get("GLIBC_TUNABLES")
    return f"malloc: GLIBC_TUNABLES={tunables}" if tunables else "malloc: glibc defaults"


def emit(title: str, lines: list[str], output: str | None) -> None:
    """Print the report, and write it under ``title`` to ``output`` if given."""
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if output:
        Path(output).write_text(f"# {title}\n\n{text}")
