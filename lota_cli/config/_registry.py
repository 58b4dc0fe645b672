"""The stage configs as Hydra reads them: the YAML files (package data, conf/), the schemas each lists first
(`<name>_schema`), and the resolvers they use."""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

from hydra.core.config_store import ConfigStore

from lota_cli import LotaError

from lota_cli.config._schemas import (CalibrateConfig, DataConfig, EvalConfig, ExportConfig, ExtractConfig,
                                      LottoConfig, MergeConfig, OverlapConfig, PlanConfig, SparseTrainConfig)

# The configs are package data (lota_cli/conf), found the same way from a checkout, a wheel or an sdist.
CONF_DIR = Path(str(importlib.resources.files("lota_cli") / "conf"))

# stage config name (conf/<name>.yaml) -> its schema, registered as <name>_schema
SCHEMAS = {"calibrate": CalibrateConfig, "extract": ExtractConfig, "sparse_train": SparseTrainConfig,
           "lotto": LottoConfig, "merge": MergeConfig, "overlap": OverlapConfig, "eval": EvalConfig,
           "export": ExportConfig, "data": DataConfig, "plan": PlanConfig}


def register_schemas(*names: str) -> None:
    """Register the schemas of stages `names` (default: all) with Hydra, as `<name>_schema`; each stage's
    YAML names only its own, and each store converts its dataclass tree (tens of ms a schema)."""
    store = ConfigStore.instance()
    for name in names or SCHEMAS:
        store.store(name=f"{name}_schema", node=SCHEMAS[name])


def register_resolvers() -> None:
    """The resolvers lota's YAML files use: ${lota.package_dir:NAME} (an installed package's directory) and
    ${lota.gpu_count:} (the default dist.num_processes of the multi-process engines)."""
    from omegaconf import OmegaConf

    def package_dir(name: str) -> str:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise LotaError(f"package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})")
        return spec.submodule_search_locations[0]

    def gpu_count() -> int:  # the default dist.num_processes of the multi-process engines
        import torch

        return max(1, torch.cuda.device_count())

    OmegaConf.register_new_resolver("lota.package_dir", package_dir, replace=True)
    OmegaConf.register_new_resolver("lota.gpu_count", gpu_count, replace=True)
