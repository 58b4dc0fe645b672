"""Native kernels (merge.c) for the passes that bound the artifact stages: the fused merge of sparse deltas
into a base, top-k's scan, the finiteness check. Compiled on first use with the system's C compiler into the
cache; without one (or with LOTA_NATIVE=0) `kernels()` is None and every caller takes its numpy path, which
gives the same results bitwise."""

from lota_cli.native._build import kernels
from lota_cli.native._kernels import KERNEL_DTYPES, MAX_INPUTS, FusedMerge, ScanBuffers, all_finite

__all__ = ["KERNEL_DTYPES", "MAX_INPUTS", "FusedMerge", "ScanBuffers", "all_finite", "kernels"]
