"""lota: Lottery Ticket Adaptation (LoTA / LoTTO) for Hugging Face causal LMs."""

__version__ = "0.1.0"


class LotaError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""
