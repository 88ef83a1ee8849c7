import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

from harness.evaluation import (  # noqa: E402
    Predictions,
    class_samples_figure,
    classification_metrics,
    confusion_figure,
    metrics_dict,
    misclassified_figure,
    per_class_figure,
    predict,
)


class TinyNet(nn.Module):
    """Smallest model honouring the harness contract: forward, embed, forward_with_embedding."""

    def __init__(self, num_classes: int = 10, dim: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, dim, 3, padding=1),
            nn.BatchNorm2d(dim),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(dim, num_classes)

    def embed(self, x):
        return self.features(x)

    def forward_with_embedding(self, x):
        e = self.embed(x)
        return self.head(e), e

    def forward(self, x):
        return self.head(self.embed(x))


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 - 0.5


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


# ----------------------------------------------------------------------------
# predict


def test_predict_shapes_dtypes_and_batching():
    torch.manual_seed(0)
    model = TinyNet(num_classes=10, dim=8)
    model.train()
    images = random_images(50)

    single = predict(model, images, normalize, batch_size=1000).cpu()
    assert isinstance(single, Predictions)
    assert single.logits.shape == (50, 10) and single.logits.dtype == torch.float32
    assert single.logits.device.type == "cpu"
    assert single.embeddings is None
    assert model.training, "predict must restore the previous train/eval mode"

    batched = predict(model, images, normalize, batch_size=7, embed=True)
    assert batched.embeddings.shape == (50, 8) and batched.embeddings.dtype == torch.float32
    torch.testing.assert_close(batched.logits, single.logits)

    # eval mode (BatchNorm running stats) matches calling the model directly in eval
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(batched.embeddings, model.embed(normalize(images)))
        torch.testing.assert_close(batched.logits, model(normalize(images)))


# ----------------------------------------------------------------------------
# classification_metrics / metrics_dict


def crafted_example():
    """3 classes, 6 samples: true [0,0,1,1,2,2], predicted [0,1,1,1,2,0]."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 0])
    logits = torch.zeros(6, 3)
    logits[torch.arange(6), preds] = 3.0
    logits[torch.arange(6), (preds + 1) % 3] = 1.0
    return logits, labels


def test_classification_metrics_hand_computed():
    logits, labels = crafted_example()
    r = classification_metrics(logits, labels, ["a", "b", "c"])

    assert r.accuracy == pytest.approx(4 / 6)
    assert r.top5_accuracy == pytest.approx(1.0)  # top-3 with only 3 classes
    np.testing.assert_array_equal(r.confusion, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    np.testing.assert_array_equal(r.predictions, [0, 1, 1, 1, 2, 0])

    # each row has logits {3, 1, 0}: p_max = e^3 / (e^3 + e + 1)
    p_max = np.exp(3) / (np.exp(3) + np.exp(1) + 1)
    np.testing.assert_allclose(r.confidence, np.full(6, p_max), rtol=1e-6)
    # correct samples lose -log(p_max); both mistakes (samples 1 and 5) leave the
    # true class on logit 0
    p_zero = 1 / (np.exp(3) + np.exp(1) + 1)
    expected_loss = -(4 * np.log(p_max) + 2 * np.log(p_zero)) / 6
    assert r.loss == pytest.approx(expected_loss, rel=1e-5)

    pc = r.per_class
    assert list(pc.index) == ["a", "b", "c"]
    assert list(pc.columns) == ["precision", "recall", "f1", "support"]
    np.testing.assert_allclose(pc["precision"], [1 / 2, 2 / 3, 1.0])
    np.testing.assert_allclose(pc["recall"], [1 / 2, 1.0, 1 / 2])
    np.testing.assert_allclose(pc["f1"], [1 / 2, 0.8, 2 / 3])
    np.testing.assert_array_equal(pc["support"], [2, 2, 2])


def test_top5_with_many_classes_and_absent_class():
    # 7 classes; sample 0's true class ranks 3rd (hit), sample 1's ranks last (miss)
    logits = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1], [7.0, 6, 5, 4, 3, 2, 1]])
    labels = torch.tensor([2, 6])
    r = classification_metrics(logits, labels, [f"c{i}" for i in range(7)])
    assert r.top5_accuracy == pytest.approx(0.5)
    assert r.accuracy == 0.0
    assert r.confusion.shape == (7, 7) and r.confusion.sum() == 2
    # classes never seen nor predicted get zeros, not NaN or warnings
    assert r.per_class.loc["c3", "precision"] == 0.0 and r.per_class.loc["c3", "support"] == 0


def test_metrics_dict_names_are_sanitised():
    logits, labels = crafted_example()
    r = classification_metrics(logits, labels, ["cat dog", "a/b.c", "ok-1_x"])
    m = metrics_dict(r)
    for key, value in m.items():
        assert re.fullmatch(r"[A-Za-z0-9_-]+", key), key
        assert isinstance(value, float)
    assert m["test_accuracy"] == pytest.approx(4 / 6)
    assert m["test_precision_cat_dog"] == pytest.approx(0.5)
    assert m["test_recall_a_b_c"] == pytest.approx(1.0)
    assert m["test_f1_ok-1_x"] == pytest.approx(2 / 3)
    assert m["test_macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert {"test_loss", "test_top5_accuracy", "test_macro_precision", "test_macro_recall"} <= m.keys()
    assert len(m) == 6 + 3 * 3

    val = metrics_dict(r, prefix="val_")
    assert all(k.startswith("val_") for k in val)


def test_metrics_dict_keeps_colliding_names_apart():
    logits, labels = crafted_example()
    m = metrics_dict(classification_metrics(logits, labels, ["a b", "a/b", "c"]))
    assert len(m) == 6 + 3 * 3


# ----------------------------------------------------------------------------
# figures


@pytest.mark.parametrize("normalize_rows", [False, True])
def test_confusion_figure_small(normalize_rows):
    names = ["a", "b", "c"]
    fig = confusion_figure(np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]]), names, normalize=normalize_rows)
    try:
        assert isinstance(fig, Figure)
        assert len(fig.axes) == 2  # heatmap + colorbar
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == names
        assert [t.get_text() for t in ax.get_yticklabels()] == names
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
        assert ax.get_title() == (
            "confusion matrix (row-normalised)" if normalize_rows else "confusion matrix (counts)"
        )
        # each cell, row by row, is annotated and coloured with its count or its share of the row
        texts = [t.get_text() for t in ax.texts]
        if normalize_rows:
            assert texts == ["0.50", "0.50", "0.00", "0.00", "1.00", "0.00", "0.50", "0.00", "0.50"]
            shown = [[0.5, 0.5, 0], [0, 1, 0], [0.5, 0, 0.5]]
        else:
            assert texts == ["1", "1", "0", "0", "2", "0", "1", "0", "1"]
            shown = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
        np.testing.assert_allclose(np.asarray(ax.collections[0].get_array()).reshape(3, 3), shown)
    finally:
        plt.close(fig)


def test_confusion_figure_many_classes_has_no_annotations():
    rng = np.random.default_rng(0)
    names = [f"class_{i}" for i in range(25)]
    counts = rng.integers(0, 10, (25, 25))
    fig = confusion_figure(counts, names, normalize=True)
    try:
        ax = fig.axes[0]
        assert len(ax.texts) == 0  # 625 numbers would be unreadable: colour only
        assert [t.get_text() for t in ax.get_xticklabels()] == names
        assert [t.get_text() for t in ax.get_yticklabels()] == names
        np.testing.assert_allclose(
            np.asarray(ax.collections[0].get_array()).reshape(25, 25), counts / counts.sum(axis=1, keepdims=True)
        )
    finally:
        plt.close(fig)


def test_per_class_figure():
    logits, labels = crafted_example()
    r = classification_metrics(logits, labels, ["a", "b", "c"])
    fig = per_class_figure(r.per_class)
    try:
        assert isinstance(fig, Figure) and len(fig.axes) == 1
        ax = fig.axes[0]
        assert len(ax.patches) == 3 * 3  # 3 metrics x 3 classes
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["precision", "recall", "f1"]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
        assert ax.get_title() == "per-class precision / recall / F1"
        # each bar's height is its metric for its class, and bars sit over their class's tick
        heights = {}
        for metric, bars in zip(["precision", "recall", "f1"], ax.containers):
            heights[metric] = [bar.get_height() for bar in bars]
            assert heights[metric] == pytest.approx(r.per_class[metric].tolist()), metric
            assert [round(bar.get_x() + bar.get_width() / 2) for bar in bars] == [0, 1, 2]
        # the crafted example by hand: predicted a twice (once right), b three times (twice), c once (right)
        assert heights["precision"] == pytest.approx([1 / 2, 2 / 3, 1])
        assert heights["recall"] == pytest.approx([1 / 2, 1, 1 / 2])
    finally:
        plt.close(fig)


def test_misclassified_figure_orders_by_confidence():
    images = random_images(8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    preds = np.array([1, 1, 0, 2, 1, 0, 1, 0])  # wrong at 0, 2, 3, 5, 6, 7
    conf = torch.tensor([0.6, 0.9, 0.97, 0.5, 0.8, 0.7, 0.55, 0.65])
    fig = misclassified_figure(images, torch.from_numpy(labels), preds, conf, ["a", "b", "c"], k=4)
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert titles == ["c→a (p=0.97)", "c→a (p=0.70)", "b→a (p=0.65)", "a→b (p=0.60)"]
        assert len(fig.axes) == 4  # 2x2 grid
        # each tile shows the image its title describes (samples 2, 5, 7, 0), as height x width x RGB
        for ax, i in zip(fig.axes, [2, 5, 7, 0]):
            np.testing.assert_array_equal(ax.images[0].get_array(), images[i].numpy().transpose(1, 2, 0))
        assert fig.get_suptitle() == "4 most confident mistakes"
    finally:
        plt.close(fig)

    # fewer mistakes than k: show them all, blank the rest of the grid
    fig = misclassified_figure(images, labels, preds, conf, ["a", "b", "c"], k=25)
    try:
        assert len([ax for ax in fig.axes if ax.get_title()]) == 6
    finally:
        plt.close(fig)


def test_misclassified_figure_without_mistakes():
    images = random_images(3)
    labels = np.array([0, 1, 2])
    fig = misclassified_figure(images, labels, labels, np.ones(3), ["a", "b", "c"])
    try:
        assert isinstance(fig, Figure) and len(fig.axes) == 1
        assert "no misclassified" in fig.axes[0].texts[0].get_text()
    finally:
        plt.close(fig)


def test_class_samples_figure():
    images = random_images(60)
    labels = torch.arange(60) % 3
    fig = class_samples_figure(images, labels, ["a", "b", "c"], per_class=4, seed=1)
    try:
        assert isinstance(fig, Figure)
        assert len(fig.axes) == 3 * 4
        assert [fig.axes[r * 4].get_ylabel() for r in range(3)] == ["a", "b", "c"]
        assert all(len(ax.images) == 1 for ax in fig.axes)
        # row r shows four different images of class r
        by_bytes = {images[i].numpy().transpose(1, 2, 0).tobytes(): int(labels[i]) for i in range(60)}
        for r in range(3):
            row = [np.asarray(ax.images[0].get_array()).tobytes() for ax in fig.axes[r * 4 : (r + 1) * 4]]
            assert [by_bytes[b] for b in row] == [r] * 4 and len(set(row)) == 4
    finally:
        plt.close(fig)


def test_class_samples_figure_caps_rows_and_handles_rare_classes():
    images = random_images(100).numpy()
    labels = np.arange(100) % 25
    labels[labels == 0] = 1  # class 0 has no images at all
    fig = class_samples_figure(images, labels, [f"c{i}" for i in range(25)], per_class=5)
    try:
        assert len(fig.axes) == 20 * 5
        assert all(len(ax.images) == 0 for ax in fig.axes[:5])  # empty row for class 0
        assert "first 20 of 25" in fig.get_suptitle()
    finally:
        plt.close(fig)
