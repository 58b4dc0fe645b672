"""Operations on deltas, tensor by tensor: exact streaming top-k selection (what makes a mask), the merge
methods and their registry, overlap statistics. numpy and the native kernels; the merge methods compute in
torch, imported when one first runs."""

from lota_cli.ops._merge_methods import (METHODS, MergeMethod, dare_seed, delta_overlap, has_negative_zero, merge,
                                         merge_method, methods_help, readers, top_k)
from lota_cli.ops._overlap import Overlap, density_by_layer, layer_of, overlap
from lota_cli.ops._top_k import k_for, top_k_mask

__all__ = ["METHODS", "MergeMethod", "Overlap", "dare_seed", "delta_overlap", "density_by_layer", "has_negative_zero",
           "k_for", "layer_of", "merge", "merge_method", "methods_help", "overlap", "readers", "top_k", "top_k_mask"]
