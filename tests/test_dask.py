"""effsk on Dask: lazy features of Dask collections, a killed worker, ``effsk featurize --dask``, GridSearchCV.

One module-scoped LocalCluster (2 worker processes, 1 thread each, CPU) serves every test. Skipped when
the ``dask`` extra is not installed.
"""

import copy
import os
import pickle
import signal
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

dask = pytest.importorskip("dask")
dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")

import cloudpickle  # noqa: E402  (a dask dependency)

from effsk.cli import main  # noqa: E402
from effsk.dask import WORKER_CONFIG, featurize  # noqa: E402
from effsk.data.images import ImageLoadError  # noqa: E402
from effsk.estimators import EfficientNetFeaturizer  # noqa: E402
from effsk.jobs import featurize as featurize_module  # noqa: E402
from effsk.jobs.chunks import featurizer_token, process_cache_info, process_featurizer  # noqa: E402
from effsk.jobs.featurize import featurize_to_parquet, read_features  # noqa: E402
from effsk.weights import build_model  # noqa: E402
from effsk.weights.checkpoint import save_checkpoint  # noqa: E402

# Dask warns about graphs over 10 MB: here that is the featurizer, in the graph once on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Sending large graph")


@pytest.fixture(scope="module")
def client():
    # Workers fork from a server that has imported torch and effsk once: the 2 workers, and the one
    # restarted after a kill, start in a fraction of a second instead of importing torch each.
    config = {"distributed.worker.multiprocessing-method": "forkserver", **WORKER_CONFIG}
    environ = dict(os.environ)  # nannies write their workers' variables into this process's environment
    try:
        with dask.config.set(config):
            context = distributed.utils.get_mp_context()
            context.set_forkserver_preload(["distributed", "pandas", "torch", "effsk.estimators", "effsk.jobs.dask"])
            cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                               dashboard_address=None, worker_dashboard_address=None)
            # Not the default client: every call names it, and effsk's own clients must not need one.
            with cluster, distributed.Client(cluster, set_as_default=False) as client:
                assert set(client.run(os.environ.get, "MALLOC_MMAP_THRESHOLD_").values()) == {str(2**25)}
                yield client
    finally:
        os.environ.clear()
        os.environ.update(environ)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask_images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(20):
        paths.append(str(root / f"{i:02d}.png"))
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def featurizer():
    return EfficientNetFeaturizer(0, weights=None, resolution=32, batch_size=8).fit()


@pytest.fixture(scope="module")
def expected(featurizer, images):
    return featurizer.transform(images)  # in-process


def _series(paths, npartitions):
    index = pd.Index(range(100, 100 + len(paths)), name="row")
    return dd.from_pandas(pd.Series(paths, index=index, name="path"), npartitions=npartitions)


def test_features_of_a_dask_series_keep_its_index_and_partitions_and_equal_transform(client, images, featurizer,
                                                                                     expected):
    paths = _series(images, npartitions=4)
    lazy = featurize(paths, featurizer)
    names = list(featurizer.get_feature_names_out())
    assert lazy.npartitions == 4 and lazy.divisions == paths.divisions and list(lazy.columns) == names
    # The fitted featurizer is one node of the graph, not a copy in each of the 4 partition tasks.
    assert len(cloudpickle.dumps(dict(lazy.__dask_graph__()))) < 1.5 * len(pickle.dumps(featurizer))

    result = client.compute(lazy).result()
    assert result.index.equals(paths.compute().index) and (result.dtypes == np.float32).all()
    np.testing.assert_allclose(result.to_numpy(), expected, rtol=1e-5, atol=1e-6)
    client.compute(lazy).result()  # a second computation of the same features

    # Each worker process took the featurizer into its cache (and prepared its model) at most once.
    token = featurizer_token(featurizer)
    loads = [info["loads"].get(token, 0) for info in client.run(process_cache_info).values()]
    assert max(loads) == 1 and sum(loads) >= 1


def test_a_one_column_frame_of_bytes_works_like_paths(client, images, featurizer, expected):
    blobs = [open(p, "rb").read() for p in images[:6]]
    with dask.config.set({"dataframe.convert-string": False}):  # else Dask decodes object columns to text
        frame = dd.from_pandas(pd.DataFrame({"image": blobs}), npartitions=2)
    result = client.compute(featurize(frame, featurizer)).result()
    np.testing.assert_allclose(result.to_numpy(), expected[:6], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pass one column"):
        featurize(frame.assign(other=1), featurizer)


def test_on_error_works_as_in_the_featurizer(client, images, featurizer, tmp_path):
    paths = [*images[:5], str(tmp_path / "missing.png"), *images[5:8]]
    nan = copy.copy(featurizer).set_params(on_error="nan")
    result = client.compute(featurize(_series(paths, npartitions=3), nan)).result()
    failed = np.isnan(result.to_numpy()).all(axis=1)
    assert result.index[failed].tolist() == [105] and not np.isnan(result.to_numpy()[~failed]).any()
    with pytest.raises(ImageLoadError, match=r"image 105 \('.*missing.png'\): file not found"):
        client.compute(featurize(_series(paths, npartitions=3), featurizer)).result()


def test_a_worker_killed_mid_run_loses_nothing(client, images, featurizer, expected):
    paths = _series(images, npartitions=20)  # one image per task: many short tasks to catch mid-way
    persisted = client.persist(featurize(paths, featurizer))
    futures = distributed.futures_of(persisted)
    pids = client.run(os.getpid)
    deadline = time.monotonic() + 60
    while not any(f.done() for f in futures) and time.monotonic() < deadline:
        time.sleep(0.002)
    finished = [f for f in futures if f.done()]
    assert finished and len(finished) < len(futures), "the run must be caught mid-way"
    victim = client.who_has(finished[0])[finished[0].key][0]
    os.kill(pids[victim], signal.SIGKILL)  # takes its finished partitions with it

    result = client.compute(persisted).result()
    assert result.index.tolist() == list(range(100, 120))  # every row exactly once, in order
    np.testing.assert_allclose(result.to_numpy(), expected, rtol=1e-5, atol=1e-6)
    client.wait_for_workers(2, timeout=60)
    assert pids[victim] not in client.run(os.getpid).values()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, pre = build_model(0, None, num_classes=0)
    path = tmp_path_factory.mktemp("dask_ckpt") / "b0.pt"
    save_checkpoint(path, model, pre.with_resolution(32))
    return path


def test_cli_dask_writes_what_a_local_run_writes_and_resumes_its_parts(client, images, checkpoint, tmp_path,
                                                                      monkeypatch):
    table = tmp_path / "images.csv"
    paths = [*images[:9], str(tmp_path / "missing.png"), *images[9:14]]
    pd.DataFrame({"path": paths}).to_csv(table, index=False)
    args = ["--phi", "0", "--weights", str(checkpoint), "--resolution", "32", "--chunk-size", "4", "--quiet",
            "--on-error", "skip"]
    assert main(["featurize", str(table), str(tmp_path / "local.parquet"), *args]) == 0
    local, local_meta = read_features(tmp_path / "local.parquet")

    # A local run that dies after its first chunk leaves one part; the Dask run computes only the other 3.
    real = featurize_module.featurize_chunk
    monkeypatch.setattr(featurize_module, "featurize_chunk",
                        lambda f, items, start: real(f, items, start) if start == 0 else 1 / 0)
    out = tmp_path / "dask.parquet"
    with pytest.raises(ZeroDivisionError):
        featurize_to_parquet(table, out, featurizer=EfficientNetFeaturizer(0, weights=str(checkpoint), resolution=32),
                             chunk_size=4, on_error="skip", verbose=0)
    monkeypatch.undo()
    with distributed.get_task_stream(client) as stream:
        assert main(["featurize", str(table), str(out), *args, "--dask", client.scheduler.address]) == 0
    assert sum(task["key"].startswith("effsk-chunk-") for task in stream.data) == 3

    result, meta = read_features(out)
    assert result["path"].tolist() == local["path"].tolist() == [p for p in paths if "missing" not in p]
    np.testing.assert_allclose(result[meta["feature_names"]].to_numpy(), local[meta["feature_names"]].to_numpy(),
                               rtol=1e-5, atol=1e-6)
    assert meta["failures"] == local_meta["failures"] and [f["index"] for f in meta["failures"]] == [9]


def test_grid_search_over_phi_runs_on_the_workers_and_ships_small_estimators(client):
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline

    from effsk.data import digits_rgb

    X, y, _ = digits_rgb(size=32, n=20)
    pipe = Pipeline([("feat", EfficientNetFeaturizer(weights=None, resolution=32)),
                     ("clf", LogisticRegression(max_iter=200))])
    search = GridSearchCV(pipe, {"feat__phi": [0, 0.5]}, cv=2)
    with distributed.get_task_stream(client) as stream, joblib.parallel_backend("dask", client=client):
        search.fit(X, y % 2)
    assert {task["worker"] for task in stream.data} <= set(client.scheduler_info()["workers"])
    assert len(stream.data) >= 4  # 2 candidates x 2 folds ran as tasks on the cluster
    assert np.isfinite(search.cv_results_["mean_test_score"]).all() and search.best_params_["feat__phi"] in (0, 0.5)
    # Tasks carry unfitted estimators: a few kB, no weights (the fitted pipeline holds megabytes).
    assert len(pickle.dumps(pipe)) < 10_000 < 1_000_000 < len(pickle.dumps(search.best_estimator_))


def test_a_process_keeps_only_the_last_few_featurizers():
    before = process_cache_info()["tokens"]
    objects = [object() for _ in range(3)]
    for i, obj in enumerate(objects):
        assert process_featurizer(f"test-token-{i}", obj) is obj
    assert process_featurizer("test-token-2", object()) is objects[2]  # the first one given is kept
    assert process_cache_info()["tokens"] == ["test-token-1", "test-token-2"]
    assert not set(before) & set(process_cache_info()["tokens"])
