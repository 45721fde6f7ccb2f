"""Jobs built from the estimators: featurize a folder or table to parquet (:mod:`.featurize`), a fitted
featurizer run over chunks in any process (:mod:`.chunks`) and on a Dask cluster (:mod:`.dask`), the
family table of ``effsk info`` (:mod:`.info`), the offline demo (:mod:`.demo`).

Layer 6, just below the command line. May import every layer below (estimators, training, weights,
data, nn, scaling, utils); the command line (:mod:`effsk.cli`) is the only thing above it.
"""
