"""Featurize Dask collections of images on a cluster: ``effsk.dask.featurize(paths, featurizer)``.

A thin public face of :mod:`effsk.jobs.dask` (needs ``pip install "effsk[dask]"``). See the README's
"Scale out" section for when to use Dask, ``torchrun`` or one process.
"""

from .jobs.dask import featurize

__all__ = ["featurize"]
