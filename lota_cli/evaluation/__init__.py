"""Evaluation: scores and their standard errors (_scoring), the model passes (answer NLL, greedy generation),
and the backends the eval stage asks for scores: lota's own and lm-evaluation-harness's."""

from lota_cli.evaluation._passes import generate, nll, nll_per_example, stop_ids
from lota_cli.evaluation._scoring import (EXACT_MATCH_RULE, ROUGE_TYPES, Scores, extract_number, is_stderr, linearized,
                                          normalize_number, paired_standard_error, per_example, rouge, rouge_scores,
                                          same_answer, standard_error, stderr_key, summary)

__all__ = ["EXACT_MATCH_RULE", "ROUGE_TYPES", "Scores", "extract_number", "generate", "is_stderr", "linearized",
           "make_backend", "nll", "nll_per_example", "normalize_number", "paired_standard_error", "per_example",
           "rouge", "rouge_scores", "same_answer", "standard_error", "stderr_key", "stop_ids", "summary"]


def make_backend(cfg):
    """The object that scores a model for `lota eval` (cfg: its EvalConfig): .settings (for results.json) and
    .evaluate(model, tokenizer) -> Scores. Made before the model loads, so that it can refuse its own inputs
    first (lm_eval's task names and data); lm_eval is imported only when chosen."""
    if cfg.eval.backend == "lm_eval":
        from lota_cli.evaluation._lm_eval import LmEvalBackend

        return LmEvalBackend(cfg.eval)
    from lota_cli.evaluation._lota import LotaBackend

    return LotaBackend(cfg)
