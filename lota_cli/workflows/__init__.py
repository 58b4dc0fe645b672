"""Work more than one stage runs: the streaming merge (`lota merge`, and `lota export format=model`), and the
mask sources `lota extract` ranks entries by."""

from lota_cli.workflows._mask_sources import SOURCES, Ranking, SeededScores, accumulated_gradients, gradient_batches, random_scores
from lota_cli.workflows._merge import Merger

__all__ = ["SOURCES", "Merger", "Ranking", "SeededScores", "accumulated_gradients", "gradient_batches",
           "random_scores"]
