"""Tensors as lota stores and reads them, with numpy alone: the dtype table, packed bits, fingerprints, views
of stored data and what its entries hold. Imports nothing of lota's but its floor; torch only inside the
functions that take or make torch tensors."""

from lota_cli.tensors._bits import (count_bits, count_bits_per, encode_positions, index_dtype, pack_bits,
                                    positions_from_bits, set_bits, set_positions, unpack_bits)
from lota_cli.tensors._dtypes import (FLOAT_CODES, WEIGHT_DTYPES, dtype_code, dtype_name, is_code, itemsize,
                                      numpy_dtype, torch_dtype)
from lota_cli.tensors._fingerprint import FINGERPRINT_SAMPLES, bfloat16_bits, fingerprint_of
from lota_cli.tensors._views import as_numpy, as_torch, finite_array, nonfinite, nonzero, signs

__all__ = [
    "FINGERPRINT_SAMPLES", "FLOAT_CODES", "WEIGHT_DTYPES", "as_numpy", "as_torch", "bfloat16_bits", "count_bits",
    "count_bits_per", "dtype_code", "dtype_name", "encode_positions", "fingerprint_of", "finite_array",
    "index_dtype", "is_code", "itemsize", "nonfinite", "nonzero", "numpy_dtype", "pack_bits",
    "positions_from_bits", "set_bits", "set_positions", "signs", "torch_dtype", "unpack_bits",
]
