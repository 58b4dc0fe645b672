"""lota: Lottery Ticket Adaptation (LoTA / LoTTO) for Hugging Face causal LMs.

The package's floor: what every layer above may use (the error users see, the cache's place, the version).
How the rest is built, layer by layer, is README.md's "How it is built".
"""

# The artifact format this lota writes (lota_cli.artifacts reads it and every older one). The version's minor
# number is that format, so `lota --version` alone says which artifacts a build reads and writes.
ARTIFACT_FORMAT = 3
__version__ = f"0.{ARTIFACT_FORMAT}.0"


class LotaError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-blank line of an exception's message (its type's name when it has none), at most `limit`
    characters: what a one-line error quotes of a library's own (often multi-line) message."""
    line = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return line[:limit]


def cache_root():
    """Where lota keeps things between runs (encoded data, compiled kernels): $LOTA_CACHE, else
    $XDG_CACHE_HOME/lota or ~/.cache/lota."""
    import os
    from pathlib import Path

    return Path(os.environ.get("LOTA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lota")
