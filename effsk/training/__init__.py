"""Training: the one loop (:mod:`.loop`) that fine-tuning and pretraining share, optimisers and
schedules (:mod:`.optim`), distributed glue (:mod:`.distributed`), run logs (:mod:`.runlog`),
pretraining (:mod:`.pretraining`, ``effsk.pretrain``) and the coefficient search (:mod:`.search`).

Layer 4. May import :mod:`effsk.weights`, :mod:`effsk.data`, :mod:`effsk.nn`, :mod:`effsk.scaling`
and :mod:`effsk.utils`; never the estimators or the command line.
"""

from .loop import FREEZE_MODES, Callback, Trainer, TrainConfig, apply_freeze, evaluate, recalibrate_bn, top_k_accuracy

__all__ = [
    "TrainConfig",
    "Callback",
    "Trainer",
    "evaluate",
    "apply_freeze",
    "recalibrate_bn",
    "top_k_accuracy",
    "FREEZE_MODES",
]
