"""Training: the one loop (:mod:`.loop`) that fine-tuning and pretraining share, with its settings
(:mod:`.config`) and model operations (:mod:`.model_ops`: freezing, evaluation, precise BN),
optimisers and schedules (:mod:`.optim`), the held-out split every trainer uses (:mod:`.splits`),
distributed glue (:mod:`.distributed`), run logs (:mod:`.runlog`), pretraining (:mod:`.pretraining`,
``effsk.pretrain``, with :mod:`.recipes` and the run directory in :mod:`.run_state`) and the
coefficient search (:mod:`.search`).

Layer 4. May import :mod:`effsk.weights`, :mod:`effsk.data`, :mod:`effsk.nn`, :mod:`effsk.scaling`
and :mod:`effsk.utils`; never the estimators or the command line.
"""

from .config import FREEZE_MODES, PRECISE_BN_BATCHES, TrainConfig
from .loop import Callback, Trainer
from .model_ops import apply_freeze, evaluate, recalibrate_bn, top_k_accuracy
from .splits import holdout_split

__all__ = [
    "TrainConfig",
    "Callback",
    "Trainer",
    "evaluate",
    "apply_freeze",
    "recalibrate_bn",
    "top_k_accuracy",
    "FREEZE_MODES",
    "PRECISE_BN_BATCHES",
    "holdout_split",
]
