"""Hugging Face causal LMs: loading (and weightless skeletons), saving, fingerprints, which weights lota
selects and can train, adding a delta, LoRA (the baseline), and the token losses."""

from lota_cli.models._loading import (causal_lm_class, load_model, load_tokenizer, save_model, skeleton,
                                      state_dict_sources)
from lota_cli.models._lora import attach_lora, merge_lora
from lota_cli.models._losses import token_nll_sum, token_nlls
from lota_cli.models._weights import (add_delta, check_tensor, check_trainable, fingerprint, model_saved_fingerprint,
                                      owner, select_params)

__all__ = ["add_delta", "attach_lora", "causal_lm_class", "check_tensor", "check_trainable", "fingerprint",
           "load_model", "load_tokenizer", "merge_lora", "model_saved_fingerprint", "owner", "save_model",
           "select_params", "skeleton", "state_dict_sources", "token_nll_sum", "token_nlls"]
