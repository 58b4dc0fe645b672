"""lota: Lottery Ticket Adaptation (LoTA / LoTTO) for Hugging Face causal LMs."""

__version__ = "0.1.0"


class LotaError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""


def cache_root():
    """Where lota keeps things between runs (encoded data, compiled kernels): $LOTA_CACHE, else
    $XDG_CACHE_HOME/lota or ~/.cache/lota."""
    import os
    from pathlib import Path

    return Path(os.environ.get("LOTA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lota")
