"""Files: safetensors read (headers checked before anything is mapped) and written (streamed, atomic), memory
maps of byte ranges, sequential direct-I/O writes, directories written whole, and Hugging Face model
directories streamed tensor by tensor. Knows nothing of what the tensors mean (artifacts/ does)."""

from lota_cli.io._directories import atomic_directory
from lota_cli.io._files import append_line, write_error, write_text
from lota_cli.io._mapping import map_array, mapped, will_need
from lota_cli.io._safetensors import TensorFileWriter, check_complete, check_data_layout, damaged, read_header
from lota_cli.io._saved_model import DEFAULT_SHARD_SIZE, INDEX, SINGLE, SavedModel, ShardedWriter, local_directory
from lota_cli.io._sequential import SequentialFile

__all__ = ["DEFAULT_SHARD_SIZE", "INDEX", "SINGLE", "SavedModel", "SequentialFile", "ShardedWriter", "TensorFileWriter",
           "append_line", "atomic_directory", "check_complete", "check_data_layout", "damaged", "local_directory",
           "map_array", "mapped", "read_header", "will_need", "write_error", "write_text"]
