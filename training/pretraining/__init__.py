"""barlow-pretrain's own parts, called by `training/pretrain.py` once it has parsed the options:
:func:`run_pretraining` and :func:`train` (:mod:`.run`, the command's body, which reads top to
bottom); the two views on the device (:mod:`.data`: :class:`PretrainingData`,
:func:`load_pretraining_data`); epochs, the resume position and agreement across processes
(:mod:`.epochs`: :class:`TrainingBatches`); the step and what is logged (:mod:`.loop`:
:class:`PretrainingStep`, :class:`LossWindow`); SIGTERM and Ctrl-C (:mod:`.signals`:
:class:`StopRequests`); the kNN monitor and the C plot (:mod:`.monitor`, :mod:`.plots`:
:class:`KnnMonitor`); and the collapse monitor (:mod:`.collapse`: :class:`RankMeMonitor`).
"""

from .collapse import RankMeMonitor
from .data import PretrainingData, load_pretraining_data
from .epochs import TrainingBatches
from .loop import LossWindow, PretrainingStep
from .monitor import KnnMonitor
from .run import PROG, RUN_FILES, run_pretraining, train
from .signals import StopRequests

__all__ = [
    "PROG",
    "RUN_FILES",
    "KnnMonitor",
    "LossWindow",
    "PretrainingData",
    "PretrainingStep",
    "RankMeMonitor",
    "StopRequests",
    "TrainingBatches",
    "load_pretraining_data",
    "run_pretraining",
    "train",
]
