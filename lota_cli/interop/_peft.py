"""LoTA sparse deltas as PEFT adapters, and back: `lota export` writes them, the stages read them.

PEFT 0.21's Super-Tuning (peft_type SUPERTUNING) holds, for each adapted nn.Linear, flat int32 positions into
its weight (`supertuning_indices`) and float32 values added there (`supertuning_values`), and its forward adds
them into the frozen weight with scatter_add, as lota adds a sparse delta with index_add: the same numbers.
But PEFT sizes those tensors from one `sparsity` for every module, int(numel * (1 - sparsity)) entries each,
while a LoTA mask (one global threshold) holds a different number in every tensor, and a file whose counts
differ does not load ("size mismatch for ...supertuning_values"). Neither Super-Tuning nor SHiRA (one count
r * (rows + columns) per module, two int32 coordinates per entry) has a per-module setting like LoRA's
rank_pattern. So an export sets the largest sparsity at which every tensor's entries fit, which stores the
fewest entries, and pads each tensor up to its count with positions outside the mask holding 0. Adding 0
changes no weight, so the adapter is exact.

Cost: 8 bytes (int32 position and float32 value) per stored entry, padding included. A sparse delta stores a
1-bit mask per weight (or int32 positions, whichever is smaller) plus one value per entry. With PEFT's
counts set by the densest tensor, the ratio grows with how unevenly the mask spreads over the tensors:
tests/test_peft.py measures it, and the README gives the numbers.

Training the adapter further in PEFT trains every stored entry, padding included: each module trains its
`count` entries, the mask's k plus count - k padding positions. Those are the lowest-numbered positions
outside the mask (the first rows of the weight), not ones chosen for the task, and in a LoTTO chain they may
be another adapter's entries. Reading the adapter back keeps any padding entry that became nonzero, so the
sparse delta read then sits on a larger mask than the one exported.

The safetensors header carries lota's metadata: `lota_source` (the exported sparse delta's Meta: base
model, base fingerprint, its own fingerprint, the config that made it) and `lota_entries` (per tensor: how
many of its stored entries are the delta's, how its positions and values were stored). Reading drops the
padding entries that are still 0, restores that storage and writes the sparse delta again, into a temporary
file that is opened and unlinked. For an adapter not changed since export, that file is bitwise the exported
one: the fingerprint computed while writing it equals the one recorded. An adapter made by PEFT itself has
no lota metadata. Its modules are mapped to the parameters `<module>.weight` of the base model named in its
adapter_config.json, whose shapes (read from that model's config alone, models.skeleton) its positions must
fit. It records no base fingerprint, so the stages check it against their base by names and shapes only.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lota_cli import LotaError, native
from lota_cli.artifacts import Artifact, Meta, parse_meta, save_sparse
from lota_cli.config import ModelConfig
from lota_cli.interop._names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ENTRIES_KEY, INDICES, PREFIX, SOURCE_KEY, VALUES
from lota_cli.io import atomic_directory, write_error, write_text
from lota_cli.models import skeleton
from lota_cli.tensors import dtype_code, dtype_name, encode_positions, nonfinite, pack_bits, torch_dtype

log = logging.getLogger(__package__)

NO_BASE_FINGERPRINT = ""  # what an adapter not made by lota records (Artifact.check_base then checks nothing)


def _count(numel: int, sparsity: float) -> int:
    """The entries Super-Tuning gives a module of `numel` weights (peft's SupertuningLayer._num_trainable)."""
    return int(numel * (1 - sparsity))


# --------------------------------------------------------------------------- writing (lota export)

def _linear_modules(delta: Artifact) -> tuple[dict, dict[str, nn.Linear]]:
    """(the base model's config as the delta records it, its nn.Linear modules by name), from the base's
    config alone: Super-Tuning adapts nn.Linear only, and the adapter's config names the base."""
    recorded = delta.meta.config.get("model")
    if not isinstance(recorded, dict) or not recorded.get("path"):
        raise LotaError(f"{delta.path} records no base model, which export needs to name it in the adapter's "
                        "config and to check its tensors; export sparse deltas made by sparse-train or lotto")
    model = skeleton(ModelConfig(**{**recorded, "quantize": None}))  # a skeleton is never quantized
    if model is None:
        raise LotaError(f"cannot read the config of base model {recorded['path']!r}, recorded in {delta.path}, "
                        "which export needs to check that every tensor is an nn.Linear weight; make that model "
                        "directory or hub id reachable from here")
    return recorded, {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _adapter_tensors(delta: Artifact, linears: dict[str, nn.Linear]) -> tuple[float, dict, dict]:
    """(PEFT's sparsity, its tensors by key, lota_entries) for one delta, padded as the module docstring says."""
    held, entries = {}, {}
    for name in delta.names:
        positions = delta.indices(name)
        encoding = "bits" if f"{name}::bits" in delta.keys else dtype_name(dtype_code(positions.dtype))
        entries[name] = [positions.numel(), encoding, dtype_name(delta.stored_dtype(f"{name}::values"))]
        if positions.numel() == 0:  # an untouched tensor is not adapted: PEFT needs an entry per module
            continue
        module, _, attr = name.rpartition(".")
        if attr != "weight" or module not in linears:
            raise LotaError(f"{delta.path}: tensor {name!r} is not the weight of an nn.Linear, the only kind of "
                            "module PEFT's Super-Tuning adapts; export it with format=model instead")
        held[name] = positions
    if not held:
        raise LotaError(f"{delta.path} holds no entries; there is nothing to export")

    # the largest sparsity at which every module's count holds its entries (counts only shrink as it grows)
    sparsity = max(0.0, 1 - max(p.numel() / delta.numel(n) for n, p in held.items()))
    while any(_count(delta.numel(n), sparsity) < p.numel() for n, p in held.items()):
        sparsity = math.nextafter(sparsity, 0.0)

    tensors = {}
    for name, positions in held.items():
        k, count = positions.numel(), _count(delta.numel(name), sparsity)
        # the first count - k free positions all lie below count, since at most k of those are taken
        taken = torch.zeros(count, dtype=torch.bool)
        taken[positions[positions < count].long()] = True
        padding = (~taken).nonzero().reshape(-1)[:count - k]
        module = PREFIX + name.removesuffix(".weight")
        tensors[f"{module}.{INDICES}"] = torch.cat([positions.long(), padding]).to(torch.int32)
        tensors[f"{module}.{VALUES}"] = torch.cat([delta.values(name).float(), torch.zeros(count - k)])
    return sparsity, tensors, entries


def _write_adapter(delta: Artifact, recorded: dict, linears: dict[str, nn.Linear], directory: Path) -> None:
    from dataclasses import asdict

    from safetensors.torch import save_file

    try:
        from peft import SupertuningConfig
    except ImportError:  # peft < 0.21
        raise LotaError("lota export writes Super-Tuning adapters, which need peft >= 0.21 (here and wherever "
                        "they are loaded); upgrade it: pip install -U peft") from None

    sparsity, tensors, entries = _adapter_tensors(delta, linears)
    modules = sorted(key.removeprefix(PREFIX).removesuffix(f".{INDICES}") for key in tensors if
                     key.endswith(INDICES))
    config = SupertuningConfig(target_modules=modules, sparsity=sparsity, task_type="CAUSAL_LM",
                               base_model_name_or_path=recorded["path"], revision=recorded.get("revision"),
                               inference_mode=True).to_dict()
    config["target_modules"] = modules  # a list in a fixed order: PEFT's own save writes a set's order
    directory.mkdir(parents=True, exist_ok=True)  # the temporary directory itself for one delta
    write_text(directory / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    try:
        save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={
            "format": "pt", SOURCE_KEY: json.dumps(asdict(delta.meta)), ENTRIES_KEY: json.dumps(entries)})
    except Exception as err:  # OSError, or safetensors' own error for a failed write
        raise write_error(directory / ADAPTER_WEIGHTS, err) from err
    log.info("%s -> %s: %d modules, sparsity %.6g, %d stored entries for %d", delta.path, directory,
             len(modules), sparsity, sum(t.numel() for k, t in tensors.items() if k.endswith(INDICES)),
             sum(e[0] for e in entries.values()))


def write_adapters(deltas: list[Artifact], directory: Path, names: list[str] | None) -> Path:
    """Write sparse deltas of one base as Super-Tuning adapters, atomically: one unnamed delta as the
    adapter directory itself, else each as directory/<name>/ (PEFT's layout for several adapters: load
    the first with PeftModel.from_pretrained(base, directory/<name>, adapter_name=<name>), the others
    with load_adapter). Holds one adapter's tensors in memory at a time, 8 bytes per stored entry."""
    recorded, linears = _linear_modules(deltas[0])
    with atomic_directory(directory) as tmp:
        for i, delta in enumerate(deltas):
            _write_adapter(delta, recorded, linears, tmp if names is None else tmp / names[i])
    return directory


# --------------------------------------------------------------------------- reading (lota_cli.inputs)

def _adapter_config(directory: Path) -> dict:
    """adapter_config.json, refusing anything but a Super-Tuning adapter of sparse entries alone."""
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        nested = sorted(p.parent.name for p in directory.glob(f"*/{ADAPTER_CONFIG}"))
        if nested:
            raise LotaError(f"{directory} holds the adapters {', '.join(nested)} in subdirectories; give one of "
                            f"them, e.g. {directory / nested[0]}")
        raise LotaError(f"{directory} is a directory without a PEFT adapter (no {ADAPTER_CONFIG}); give a sparse "
                        "delta file or a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise LotaError(f"{config_path} is not readable as JSON ({err}); re-save the adapter") from None
    if not isinstance(config, dict):
        raise LotaError(f"{config_path} is not a JSON object; re-save the adapter")
    kind = config.get("peft_type")
    if kind != "SUPERTUNING":
        raise LotaError(f"{directory} is a PEFT {kind} adapter, and lota reads sparse ones (peft_type "
                        "SUPERTUNING, as `lota export` writes); to evaluate a LoRA adapter, merge it into its base "
                        "(PEFT's merge_and_unload, then save_pretrained) and give that as eval.model_dir")
    if config.get("r") is not None:
        raise LotaError(f"{directory} is a Supra adapter (Super-Tuning plus LoRA, r={config['r']}), whose LoRA "
                        "part a sparse delta cannot hold; give a Super-Tuning adapter with r null")
    if config.get("save_precomputed_indices") is False:
        raise LotaError(f"{directory} stores no positions (save_precomputed_indices=false: PEFT recomputes them "
                        "from the base weights); re-save it with save_precomputed_indices=True")
    return config


def _stored_modules(weights: Path, keys) -> dict[str, tuple[str, str]]:
    """module name -> (its positions' key, its values' key), refusing any other tensor."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        module, _, what = key.rpartition(".")
        if what not in (INDICES, VALUES):
            raise LotaError(f"{weights} holds {key!r}, which is not a Super-Tuning position or value tensor (a "
                            "modules_to_save copy?); lota reads adapters of sparse entries only")
        modules.setdefault(module.removeprefix(PREFIX), {})[what] = key
    for module, found in modules.items():
        if len(found) != 2:
            raise LotaError(f"{weights}: module {module!r} has {next(iter(found))} but not its pair; the adapter "
                            "is damaged: re-save it")
    return {module: (found[INDICES], found[VALUES]) for module, found in modules.items()}


def _read_entries(weights: Path, file, module: str, keys: tuple[str, str], numel: int):
    """A module's (positions, values) as stored, checked to fit a weight of `numel` entries."""
    positions, values = file.get_tensor(keys[0]), file.get_tensor(keys[1])
    if (positions.dim() != 1 or values.dim() != 1 or positions.numel() != values.numel()
            or positions.is_floating_point() or not values.is_floating_point()):
        raise LotaError(f"{weights}: module {module!r} stores positions {positions.dtype} {list(positions.shape)} "
                        f"and values {values.dtype} {list(values.shape)}, not two matching vectors; re-save it")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= numel):
        raise LotaError(f"{weights}: module {module!r} holds positions outside its weight's {numel} entries; the "
                        "adapter was made for another base model: use one made for this base")
    if not native.all_finite(values):
        raise nonfinite(f"{weights}: module {module!r}", "its training diverged")
    return positions.long(), values


def _sorted(weights: Path, module: str, positions: torch.Tensor, values: torch.Tensor):
    """Entries in position order, as a sparse delta holds them, refusing a position held twice."""
    order = positions.argsort(stable=True)
    positions, values = positions[order], values[order]
    twice = (positions[1:] == positions[:-1]).nonzero()
    if twice.numel():
        raise LotaError(f"{weights}: module {module!r} holds position {int(positions[twice[0, 0]])} twice; a "
                        "sparse delta holds each entry once: re-save the adapter")
    return positions, values


def _encode(positions: torch.Tensor, numel: int, stored_as: str | None) -> tuple[str, torch.Tensor]:
    """Positions as the exported delta stored them ('bits' or an index dtype), else the smaller encoding."""
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[positions] = True
    if stored_as is None:
        return encode_positions(pack_bits(mask), numel)
    return ("bits", pack_bits(mask)) if stored_as == "bits" else ("idx", positions.to(torch_dtype(stored_as)))


def _from_lota(weights: Path, file, metadata: dict) -> tuple[Meta, dict, dict, dict]:
    """(the exported delta's Meta, shapes, positions, values) of an adapter lota wrote, padding dropped."""
    meta = parse_meta(weights, metadata[SOURCE_KEY])
    try:
        entries = json.loads(metadata[ENTRIES_KEY])
        stored_as = {name: (int(entries[name][0]), entries[name][1], torch_dtype(entries[name][2]))
                     for name in meta.shapes}
        if meta.kind != "sparse_delta" or not all(isinstance(e[2], torch.dtype) for e in stored_as.values()):
            raise ValueError
    except (KeyError, ValueError, TypeError, IndexError, AttributeError):
        raise LotaError(f"{weights}: its lota metadata is damaged; export the adapter again") from None
    stored = _stored_modules(weights, file.keys())
    extra = sorted(set(stored) - {name.removesuffix(".weight") for name in meta.shapes})
    if extra:
        raise LotaError(f"{weights} adapts module {extra[0]!r}, which its lota metadata does not list; export the "
                        "adapter again")
    shapes, positions, values = {}, {}, {}
    for name, shape in meta.shapes.items():
        module, numel = name.removesuffix(".weight"), math.prod(shape)
        k, encoding, dtype = stored_as[name]
        if module in stored:
            index, value = _read_entries(weights, file, module, stored[module], numel)
        else:  # a tensor without entries is not adapted
            index, value = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        if index.numel() < k:
            raise LotaError(f"{weights}: module {module!r} stores {index.numel()} entries, fewer than the {k} its "
                            "lota metadata lists; export the adapter again")
        kept = torch.cat([torch.ones(k, dtype=torch.bool), value[k:] != 0])  # padding kept if trained away from 0
        index, value = _sorted(weights, module, index[kept], value[kept])
        if not torch.equal(value.to(dtype).float(), value.float()):  # trained on in float32: keep its precision
            dtype = value.dtype
        shapes[name] = tuple(shape)
        positions[name] = _encode(index, numel, encoding if index.numel() == k else None)
        values[name] = value.to(dtype)
    return meta, shapes, positions, values


def _from_peft(weights: Path, file, config: dict) -> tuple[Meta, dict, dict, dict]:
    """(Meta, shapes, positions, values) of an adapter PEFT wrote: modules mapped to `<module>.weight` of the
    base its config names, read from that base's config alone."""
    base = config.get("base_model_name_or_path")
    if not base:
        raise LotaError(f"{weights.parent / ADAPTER_CONFIG} names no base model (base_model_name_or_path), whose "
                        "tensor shapes lota needs to read the adapter; set it to the base's hub id or directory")
    model = skeleton(ModelConfig(path=base, revision=config.get("revision")))
    if model is None:
        raise LotaError(f"cannot read the config of base model {base!r}, named in {weights.parent / ADAPTER_CONFIG}, "
                        "which lota needs for the adapter's tensor shapes; make it reachable from here")
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    stored = _stored_modules(weights, file.keys())
    for module in stored:
        if f"{module}.weight" not in params:
            raise LotaError(f"{weights} adapts module {module!r}, which base model {base!r} does not have; the "
                            "adapter was made for another architecture: use one made for this base")
    shapes, positions, values = {}, {}, {}
    for name in [n for n in params if n.removesuffix(".weight") in stored]:  # in the model's order
        module, numel = name.removesuffix(".weight"), math.prod(params[name])
        index, value = _sorted(weights, module, *_read_entries(weights, file, module, stored[module], numel))
        shapes[name], positions[name], values[name] = params[name], _encode(index, numel, None), value
    meta = Meta(kind="sparse_delta", base_model=base, base_fingerprint=NO_BASE_FINGERPRINT, stage="peft",
                sparsity=config.get("sparsity"), config={"model": {"path": base, "revision": config.get("revision")}},
                versions={"peft": str(config.get("peft_version"))})
    return meta, shapes, positions, values


def read_adapter(path: Path, kinds: tuple[str, ...]) -> Artifact:
    """A Super-Tuning adapter (its directory, or its adapter_model.safetensors) as the sparse delta it holds:
    an Artifact over a temporary sparse delta file, unlinked once open, whose `path` is the adapter's."""
    from safetensors import safe_open

    directory, weights = (path, path / ADAPTER_WEIGHTS) if path.is_dir() else (path.parent, path)
    config = _adapter_config(directory)
    if "sparse_delta" not in kinds:
        raise LotaError(f"{path} is a PEFT adapter, which lota reads as a sparse delta; this stage needs a "
                        f"{' or a '.join(kinds)}")
    if not weights.is_file():
        raise LotaError(f"{directory} has no {ADAPTER_WEIGHTS} (lota does not read pickled adapter_model.bin); "
                        "re-save the adapter with save_pretrained(..., safe_serialization=True)")
    try:
        file = safe_open(str(weights), framework="pt")
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise LotaError(f"{weights} is not a readable safetensors file ({err}); re-save the adapter") from err
    metadata = file.metadata() or {}
    made_by_lota = SOURCE_KEY in metadata
    meta, shapes, positions, values = (_from_lota(weights, file, metadata) if made_by_lota
                                       else _from_peft(weights, file, config))
    exported = meta.fingerprint
    tmp = Path(tempfile.mkdtemp(prefix="lota-peft-"))
    try:
        artifact = Artifact(save_sparse(tmp / "sparse_delta.safetensors", meta, shapes, positions, values), kinds)
    finally:
        shutil.rmtree(tmp)  # the artifact reads its open file
    artifact.path = path
    if not made_by_lota:
        log.warning("%s was not made by lota: it records no base fingerprint, so only its tensor names and shapes "
                    "are checked against the base", path)
    elif meta.fingerprint != exported:
        log.warning("%s differs from the sparse delta it was exported from (fingerprint %s, now %s): trained or "
                    "edited since; reading it as it is now", path, exported[:12], meta.fingerprint[:12])
    log.info("read PEFT adapter %s as a sparse delta: %d tensors, %d entries", path, len(shapes),
             sum(v.numel() for v in values.values()))
    return artifact
