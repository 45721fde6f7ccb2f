"""Featurize Dask collections of images on a cluster: ``effsk.dask.featurize(paths, featurizer)``;
``effsk.dask.WORKER_CONFIG``: the Dask settings under which CPU workers run torch at full speed.

A thin public face of :mod:`effsk.jobs.dask` (needs ``pip install "effsk[dask]"``). See the README's
"Scale out" section for when to use Dask, ``torchrun`` or one process.
"""

from .jobs.dask import WORKER_CONFIG, featurize

__all__ = ["WORKER_CONFIG", "featurize"]
