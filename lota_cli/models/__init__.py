"""Hugging Face causal LMs: loading (and weightless skeletons, and bases held quantized), saving, fingerprints,
which weights lota selects and can train, adding a delta, linear layers over a frozen weight plus sparse
values, LoRA (the baseline), and the token losses."""

from lota_cli.models._frozen import (frozen_linear, frozen_weight, is_quantized, prepare_quantized, quantized_layers,
                                     weight_shape, with_values)
from lota_cli.models._loading import (causal_lm_class, load_model, load_tokenizer, save_model, skeleton,
                                      state_dict_sources)
from lota_cli.models._lora import attach_lora, lora_delta, merge_lora
from lota_cli.models._losses import completion_logps, token_nll_sum, token_nlls
from lota_cli.models._weights import (add_delta, check_tensor, check_trainable, fingerprint, model_saved_fingerprint,
                                      owner, select_params)

__all__ = ["add_delta", "attach_lora", "causal_lm_class", "check_tensor", "check_trainable", "completion_logps",
           "fingerprint", "frozen_linear", "frozen_weight", "is_quantized", "load_model", "load_tokenizer",
           "lora_delta", "merge_lora", "model_saved_fingerprint", "owner", "prepare_quantized", "quantized_layers",
           "save_model", "select_params", "skeleton", "state_dict_sources", "token_nll_sum", "token_nlls",
           "weight_shape", "with_values"]
