"""Typed configuration: the option machinery, the stage schemas (validated once when a stage starts), the
parameter selection they describe, and their registration with Hydra."""

from lota_cli.config._options import one_of, opt, parse_size, positive
from lota_cli.config._params import ATTN_MLP_WEIGHTS, ParamsConfig, param_matcher, selected
from lota_cli.config._registry import CONF_DIR, SCHEMAS, register_resolvers, register_schemas
from lota_cli.config._schemas import (ADAPTER_NAME, ENGINES, MASK_SOURCES, QUANTIZE, REPLICATED_ENGINES,
                                      CalibrateConfig, DataConfig, DataOptions, DistConfig, EvalConfig, EvalOptions,
                                      ExportConfig, ExtractConfig, ExtractOptions, LmEvalOptions, LoraOptions,
                                      LottoConfig, LottoOptions, MergeConfig, ModelConfig, OptimConfig, OverlapConfig,
                                      PlanConfig, PlanOptions, SparseTrainConfig, SparseTrainOptions, StageConfig,
                                      TaskConfig, TrainConfig, TrainStageConfig, TrainingSettings)

__all__ = ["ADAPTER_NAME", "ATTN_MLP_WEIGHTS", "CONF_DIR", "ENGINES", "MASK_SOURCES", "QUANTIZE",
           "REPLICATED_ENGINES", "SCHEMAS", "CalibrateConfig", "DataConfig", "DataOptions", "DistConfig",
           "EvalConfig", "EvalOptions", "ExportConfig", "ExtractConfig", "ExtractOptions", "LmEvalOptions",
           "LoraOptions", "LottoConfig", "LottoOptions", "MergeConfig", "ModelConfig", "OptimConfig", "OverlapConfig",
           "ParamsConfig", "PlanConfig", "PlanOptions", "SparseTrainConfig", "SparseTrainOptions", "StageConfig",
           "TaskConfig", "TrainConfig", "TrainStageConfig", "TrainingSettings", "one_of", "opt", "param_matcher",
           "parse_size", "positive", "register_resolvers", "register_schemas", "selected"]
