"""The LightningModules of the three π-Tuning stages (importing this package imports Lightning)."""

from pituning.modules.callbacks import RestoreBest
from pituning.modules.embedding import FisherMetric, TaskEmbeddingModule
from pituning.modules.expert import ExpertTrainingModule, FullFineTuningModule
from pituning.modules.interpolate import InterpolationModule, select_sources

__all__ = [
    "ExpertTrainingModule",
    "FisherMetric",
    "FullFineTuningModule",
    "InterpolationModule",
    "RestoreBest",
    "TaskEmbeddingModule",
    "select_sources",
]
