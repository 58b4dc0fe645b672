"""Merging task vectors / sparse deltas of one base, tensor by tensor: into one task vector, or into the base's
weights as a model directory. What `lota merge` runs, and `lota export format=model` (a sum of a chain).

Streams tensor by tensor: for each tensor, read every input's delta, merge (ops' registered method), and
write it out, so peak memory is a few tensors per input rather than whole models. Into a model, the base's
safetensors shards are streamed the same way (io.SavedModel): each base tensor is read in pieces, the merged
delta added where there is one, and the result written to output shards; no model object is built. Sparse
deltas merge at the union of their positions alone, never densified, under sum, task_arithmetic
(elementwise) and ties, magnitude (whose per-tensor top-k counts the zeros elsewhere); into a model, sum and
task_arithmetic run as one fused native pass per piece of the base (lota_cli.native: the masks read as
packed bits, the values where they lie), bit for bit what the numpy path computes. A base that cannot be
streamed (a GGUF file, or weights renamed on load) is loaded as a model instead, as the log says. The
pairwise overlap and sign conflicts of the inputs are counted on the way. torch is imported only where a
method computes in it, or a model is loaded.
"""

from __future__ import annotations

import itertools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lota_cli import LotaError, native
from lota_cli.artifacts import Artifact, ArtifactWriter, Meta
from lota_cli.config import ModelConfig
from lota_cli.io import SavedModel, ShardedWriter, local_directory, write_text
from lota_cli.ops import METHODS, Overlap, delta_overlap, has_negative_zero, merge
from lota_cli.tensors import (as_torch, dtype_code, dtype_name, fingerprint_of, itemsize, nonfinite, numpy_dtype,
                              torch_dtype)

log = logging.getLogger(__package__)
REGION_BYTES = 8 << 20  # of the output filled at a time: a kernel run's share stays in a core's cache
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".index.json")


def _fused_delta(merger: "Merger", name: str, numel: int, code: str):
    """The merged delta of `name` in dtype `code`, region by region, from the native kernel adding it to
    zeros: the same values as merger.dense (a sum that is -0.0 comes out as +0.0, an equal value)."""
    region = np.empty(_region_entries(code), dtype=numpy_dtype(code))
    _, fused = delta = merger.fused(name)
    for start in range(0, numel, region.size):
        part = region[:min(region.size, numel - start)]
        part.fill(0)
        _fused_into(part, start, *delta, merger.inputs, code)
        yield part
    merger.count(fused)


class Merger:
    """A merge of `inputs` (task vectors or sparse deltas of one base, checked to share its layout: see
    artifacts.same_layout) by a registered method (ops.METHODS) given `params` (the MergeConfig fields it
    reads), then scaled, written as dtype `dtype`: tensor by tensor, to a task vector (to_task_vector) or
    added to the base's weights (into_model), counting the inputs' pairwise overlaps on the way."""

    def __init__(self, inputs: list[Artifact], method: str = "sum", params: dict | None = None, scale: float = 1.0,
                 dtype: str = "float32"):
        self.inputs, self.method, self.params, self.scale, self.dtype = inputs, method, dict(params or {}), scale, dtype
        self.pairs = list(itertools.combinations(range(len(inputs)), 2))
        self.stats = {pair: Overlap() for pair in self.pairs}
        # sparse inputs of an at_union method merge at the union of their positions
        self.sparse = METHODS[method].at_union and all(a.kind == "sparse_delta" for a in inputs)
        self.native = METHODS[method].native if self.sparse and len(inputs) <= native.MAX_INPUTS else None
        log.info("merging %d inputs (%s) over %d tensors with method=%s%s", len(inputs),
                 ", ".join(a.path.name for a in inputs), len(inputs[0].names), method,
                 "".join(f" {key}={value}" for key, value in self.params.items()))

    def to_task_vector(self, path: Path, meta: Meta) -> Path:
        """Write the merged delta as a task vector at `path`, its metadata `meta` (the tensors' shapes filled
        in here)."""
        first, code = self.inputs[0], dtype_code(self.dtype)
        meta.shapes = {n: list(first.shape(n)) for n in first.names}
        fused = self.native and native.kernels() is not None
        with ArtifactWriter(path, meta, {n: (code, first.shape(n)) for n in first.names}) as writer:
            for name in first.names:
                if fused:
                    writer.write_pieces(name, _fused_delta(self, name, first.numel(name), code))
                else:
                    writer.write(name, self.dense(name).to(torch_dtype(code)))
        return Path(path)

    def into_model(self, directory: Path, shard_size: int) -> Path:
        """Write base + merged delta as a Hugging Face model directory at `directory` (shards of at most
        `shard_size` bytes), streaming the base the inputs record (or loading it as a model where it cannot be
        streamed)."""
        return _into_model(self, Path(directory), shard_size)

    def _merged(self, name: str, deltas: list, numel: int | None = None):
        for i, j in self.pairs:
            self.stats[i, j] += delta_overlap(deltas[i], deltas[j])
        return merge(self.method, deltas, name=name, numel=numel, scale=self.scale, **self.params)

    def dense(self, name: str):
        """The merged delta of `name` as a dense float32 torch tensor."""
        import torch

        if self.sparse:
            positions, values = self.at_positions(name)
            return torch.zeros(self.inputs[0].numel(name)).index_put_((positions,), values).view(
                self.inputs[0].shape(name))
        return self._merged(name, self._dense_deltas(name))

    def _dense_deltas(self, name: str) -> list:
        deltas = [a.dense(name) for a in self.inputs]
        for artifact, delta in zip(self.inputs, deltas):  # a sparse delta's values were checked as they were read
            if artifact.kind == "task_vector" and not native.all_finite(delta):
                raise nonfinite(f"{artifact.path}: tensor {name!r}",
                                "the run that made it diverged, so redo it (lower train.lr)")
        return deltas

    def at_positions(self, name: str) -> tuple:
        """(sorted flat positions, merged float32 values there) of `name` as torch tensors, for `sparse`
        mergers: each input's values are laid over the union of positions (zeros elsewhere), which an at_union
        method merges exactly as it would the dense tensors. The union is the OR of the inputs' masks."""
        import torch

        held = [a.held(name) for a in self.inputs]
        numel = self.inputs[0].numel(name)
        if METHODS[self.method].takes_numel and any(has_negative_zero(values) for _, values in held):
            # which zeros a top-k keeps then depends on where every zero lies: merge the whole tensors
            return torch.arange(numel), self._merged(name, [d.reshape(-1) for d in self._dense_deltas(name)])
        masks = [mask.numpy() for mask, _ in held]
        positions = np.flatnonzero(np.logical_or.reduce(masks) if len(masks) > 1 else masks[0])
        deltas = []
        for mask, (_, values) in zip(masks, held):
            # values follow the set entries in row-major order, which is their order among the union's
            compact = torch.zeros(positions.size, dtype=torch.float32)
            compact[torch.from_numpy(mask[positions])] = values.float()
            deltas.append(compact)
        return torch.from_numpy(positions), self._merged(name, deltas, numel)  # int64 positions

    def fused(self, name: str) -> tuple[str, native.FusedMerge]:
        """(name, the merge of `name` ready to run over the base's pieces) for native mergers: each input's
        packed mask and values as stored, mapped rather than copied (checked against their checksums;
        bfloat16 values as uint16)."""
        # mapped, not copied; their finiteness is checked by the kernel, as it adds them
        values = [a.values_array(name, check_finite=False) for a in self.inputs]
        values = [v if v.dtype in (np.float32, np.uint16) else v.astype(np.float32) for v in values]
        bits = [a.packed_bits(name) for a in self.inputs]
        weights = None
        if self.native == "weighted":
            weights = list(self.params.get("weights") or [1.0] * len(self.inputs))
        try:
            # a region's two halves are merged side by side
            piece = _region_entries(dtype_code(self.dtype)) // 2
            return name, native.FusedMerge(native.kernels(), bits, values, weights, self.scale, piece)
        except ValueError as err:  # an input's count of values is not its count of positions: its own check
            self.inputs[err.args[0]].held(name)
            raise

    def count(self, fused: native.FusedMerge) -> None:
        for (i, j), both, same in zip(self.pairs, fused.shared, fused.agree):
            self.stats[i, j] += Overlap(fused.nonzero[i], fused.nonzero[j], both, same)

    def log_overlaps(self) -> None:
        for (i, j), s in self.stats.items():
            jaccard = "n/a" if s.jaccard is None else f"{s.jaccard:.4f}"
            conflicts = "n/a" if s.sign_conflicts is None else f"{s.sign_conflicts:.2%}"
            log.info("%s vs %s: Jaccard %s (%d shared of %d), sign conflicts on shared entries %s",
                     self.inputs[i].path.name, self.inputs[j].path.name, jaccard, s.shared, s.union, conflicts)


def _recorded_model(inputs: list[Artifact], dtype: str) -> ModelConfig:
    """The base model the inputs were made from, as recorded in their metadata, in the output dtype."""
    recorded = next((a.meta.config["model"] for a in inputs if isinstance(a.meta.config.get("model"), dict)), None)
    if recorded is None:
        raise LotaError(f"none of {[str(a.path) for a in inputs]} records the model it was made from (a merge's "
                        "own output does not); merge to a task vector instead and apply it with `lota eval`")
    quantized = sorted({a.meta.config["model"]["quantize"] for a in inputs
                        if isinstance(a.meta.config.get("model"), dict) and a.meta.config["model"].get("quantize")})
    if quantized:  # as QLoRA users merge into the fp16 base
        log.info("%s trained against the %s-quantized base; merging into its full-precision weights",
                 ", ".join(a.path.name for a in inputs), " and ".join(quantized))
    # gradient checkpointing would change the saved config's use_cache
    return ModelConfig(**{**recorded, "dtype": dtype, "gradient_checkpointing": False, "quantize": None})


def _into_model(merger: Merger, output: Path, shard_size: int) -> Path:
    """Write base + merged delta as a model directory at `output`, streaming the base's shards."""
    inputs = merger.inputs
    model_cfg = _recorded_model(inputs, merger.dtype)
    directory, why_not = local_directory(model_cfg)
    checkpoint = SavedModel(directory) if directory is not None else None
    delta_of = _checked_base(inputs, checkpoint, model_cfg) if checkpoint is not None else None
    if delta_of is None:
        log.info("the base %s cannot be streamed (%s): loading it as a model", model_cfg.path,
                 why_not or "its checkpoint names are not the model's parameter names")
        return _through_model(merger, model_cfg, output, shard_size)

    code = dtype_code(merger.dtype)
    log.info("streaming %s (%d tensors) into %s", directory, len(checkpoint.names), output)
    layout = {name: (code, checkpoint.shape(name)) for name in checkpoint.names}
    lib = native.kernels() if merger.native else None
    merge_one = merger.fused if lib else merger.at_positions if merger.sparse else merger.dense
    names, entries = checkpoint.names, _region_entries(code)
    deltas = [delta_of[name] for name in names if name in delta_of]
    with ShardedWriter(output, layout, shard_size) as writer, \
            ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as reader:
        # the next tensor's delta is read (and checked) on a second thread while this one is written; on a
        # third, the kernel is asked to read from disk the next base tensor and the deltas after that
        merged, done = _ahead(pool, merge_one, deltas), 0  # done: deltas taken so far
        for i, name in enumerate(names):
            if i + 1 < len(names):
                reader.submit(checkpoint.read_ahead, names[i + 1])
            delta = None
            if name in delta_of:
                if done + 2 < len(deltas):
                    reader.submit(lambda later=deltas[done + 2]: [a.read_ahead(later) for a in inputs])
                delta, done = next(merged), done + 1
            for start, region in writer.regions(name, entries):  # the output's own buffer: filled in place
                if lib and delta is not None:  # each thread reads the base into its part, then merges there
                    _fused_into(region, start, *delta, merger.inputs, code,
                                fill=lambda part, at, name=name: _base_into(checkpoint, name, at, part, code))
                    continue
                _base_into(checkpoint, name, start, region, code)
                if delta is not None:
                    piece = as_torch(region, code)
                    _add_at(piece, start, *delta) if merger.sparse else _add_dense(piece, start, delta.reshape(-1))
            if lib and delta is not None:
                merger.count(delta[1])
        writer.copy_files(directory, skip={p.name for p in directory.iterdir() if p.name.endswith(WEIGHT_FILES)})
        _finish_config(writer.tmp / "config.json", merger.dtype)
    return output


def _region_entries(code: str) -> int:
    """Entries of the output (safetensors dtype `code`) filled at a time."""
    return REGION_BYTES // itemsize(code)


def _base_into(checkpoint, name: str, start: int, region: np.ndarray, code: str) -> None:
    """The base's entries [start, start + region.size) of `name`, in safetensors dtype `code`, into `region`,
    refused if any is NaN or Inf (as loading the model would refuse them)."""
    stored = checkpoint.dtype(name)
    if stored == code:
        checkpoint.read_into(name, start, region)  # its bytes as they are
        if not native.all_finite(region):
            raise checkpoint.nonfinite(name)
        return
    with checkpoint.mapped(name, start, start + region.size) as piece:
        if not native.all_finite(piece, stored):
            raise checkpoint.nonfinite(name)
        as_torch(region, code).copy_(as_torch(piece, stored))  # rounded as torch rounds
        del piece
    if not native.all_finite(region):  # finite in the base's dtype, beyond the range of this one
        raise _overflow(code)


def _ahead(pool, fn, items: list):
    """fn(item) for each item, in order, each computed on `pool` while the caller works on the one before:
    one result waits at most, so memory stays at two tensors' deltas."""
    if not items:
        return
    future = pool.submit(fn, items[0])
    for item in items[1:]:
        result, future = future.result(), pool.submit(fn, item)
        yield result
    yield future.result()


def _checked_base(inputs: list[Artifact], checkpoint, model_cfg: ModelConfig) -> dict[str, str] | None:
    """{checkpoint tensor: the delta tensor added to it}, once the checkpoint is checked to be the inputs'
    base; None when it cannot be matched to the model's names (the caller loads the model instead).

    The inputs' base_checkpoint (a fingerprint of the base's weights as saved, in name order) is checked
    against the shards alone. Artifacts without one (or a checkpoint that saves tied weights twice) are
    checked by base_fingerprint, in the model's state_dict order, which the weightless skeleton gives:
    a second or more of importing the model's code."""
    first = inputs[0]
    recorded = first.meta.base_checkpoint
    if (recorded and all(name in checkpoint for name in first.names)
            and recorded == checkpoint.saved_fingerprint()):
        return {name: name for name in first.names}
    from lota_cli.models import state_dict_sources  # torch and the model's code: only when needed

    sources = state_dict_sources(model_cfg, checkpoint)
    if sources is None:
        return None
    first.check_base(fingerprint_of(checkpoint.flat_tensors(sources)), model_cfg.path)
    delta_of = {}
    for name in first.names:
        if name not in sources:
            raise LotaError(f"{first.path} has tensor {name!r}, which this model does not have; it was made for "
                            "another architecture: use artifacts made from this base model")
        if sources[name] in delta_of:
            raise LotaError(f"{first.path} has deltas for both {delta_of[sources[name]]!r} and {name!r}, which are "
                            "one tied weight of this model; merge them into one first")
        delta_of[sources[name]] = name
    return delta_of


def _add_at(piece, start: int, positions, values) -> None:
    """float32 `values` added at flat `positions` to the base's entries [start, start + piece.numel()), in
    place, rounded once to the piece's dtype: the same arithmetic, entry by entry, as adding the dense delta
    (whose other entries are 0)."""
    import torch

    lo, hi = torch.searchsorted(positions, torch.tensor([start, start + piece.numel()])).tolist()
    local = positions[lo:hi] - start
    added = (piece[local].float() + values[lo:hi]).to(piece.dtype)
    _check_finite(added)
    piece[local] = added


def _fused_into(region: np.ndarray, start: int, name: str, fused: native.FusedMerge, inputs: list[Artifact],
                code: str, fill=None) -> None:
    """The merged delta of `name` added to the base's entries [start, ...) by the native kernel, in place
    (what _add_at computes), which also refuses a NaN or Inf value of an input; fill: see FusedMerge.into."""
    try:
        fused.into(region, start, fill)
    except OverflowError:
        raise _overflow(code) from None
    except FloatingPointError as err:
        raise inputs[err.args[0]].nonfinite_values(name) from None


def _add_dense(piece, start: int, delta) -> None:
    added = (piece.float() + delta[start:start + piece.numel()]).to(piece.dtype)
    _check_finite(added)
    piece.copy_(added)


def _check_finite(tensor) -> None:
    if not native.all_finite(tensor):
        raise _overflow(dtype_code(tensor.dtype))


def _overflow(code: str) -> LotaError:
    return LotaError(f"the merged weight overflows {dtype_name(code)} (Inf); merge in float32 (dtype=float32) or "
                     "lower scale=")


def _finish_config(config: Path, dtype: str) -> None:
    """The copied config.json names the dtype the weights are now stored in, and the model class: a base whose
    config lists no `architectures` (one written from a bare config class, not by save_pretrained) gets its
    model_type's causal-LM class, since mergekit and vLLM pick the model class from that list (mergekit fails
    on its absence with a TypeError). Looking the class up imports transformers, so only then."""
    if not config.is_file():
        return
    data = json.loads(config.read_text())
    data["dtype"] = dtype
    if "torch_dtype" in data:
        data["torch_dtype"] = dtype
    if not data.get("architectures") and data.get("model_type"):
        from lota_cli.models import causal_lm_class

        name = causal_lm_class(data["model_type"])
        if name:
            data["architectures"] = [name]
            log.info("the base's config.json lists no architectures; the output's says %s (from model_type %s)",
                     name, data["model_type"])
        else:
            log.warning("the base's config.json lists no architectures and transformers knows no causal LM for "
                        "model_type %s; the output's has none either (mergekit and vLLM need it)", data["model_type"])
    write_text(config, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _through_model(merger: Merger, model_cfg: ModelConfig, output: Path, shard_size: int) -> Path:
    """The base loaded as a model (GGUF, renamed weights), the merged deltas added, the model saved."""
    import torch

    from lota_cli.models import check_tensor, fingerprint, load_model, save_model

    model, tokenizer = load_model(model_cfg)
    first = merger.inputs[0]
    first.check_base(fingerprint(model), model_cfg.path)
    with torch.no_grad():
        for name in first.names:
            param = check_tensor(model, name, first.shape(name), str(first.path))
            param.copy_((param.float() + merger.dense(name).view(param.shape)).to(param.dtype))  # round once
    return save_model(model, tokenizer, output, shard_size)
