"""evaluate(): top-k errors, loss, confusion and per-class counts on hand-made logits; flip TTA."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from resnetlab.errors import DataError, ResnetlabError
from resnetlab.evaluate import EvalResult, evaluate, topk_correct


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


class LookupModel(torch.nn.Module):
    """Returns a fixed row of logits per image: image i carries its index i in pixel (0, 0, 0)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone(), requires_grad=False)

    def forward(self, x):
        index = (x[:, 0, 0, 0] * 255).round().long()
        return self.table[index]


def indexed_images(n: int, size: int = 4) -> torch.Tensor:
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return images


# Six images, six classes. Rank of the true class in each row: 1, 2, 3, 4, 5, 6.
LOGITS = torch.tensor(
    [
        [9.0, 1, 2, 3, 4, 5],  # true 0: rank 1
        [9.0, 8, 1, 2, 3, 4],  # true 1: rank 2
        [9.0, 8, 7, 1, 2, 3],  # true 2: rank 3
        [9.0, 8, 7, 6, 1, 2],  # true 3: rank 4
        [9.0, 8, 7, 6, 5, 1],  # true 4: rank 5
        [9.0, 8, 7, 6, 5, 4],  # true 5: rank 6
    ]
)
LABELS = torch.arange(6)


def test_topk_correct_counts_rank_of_true_class():
    assert topk_correct(LOGITS, LABELS, (1, 2, 3, 5, 6)).tolist() == [1, 2, 3, 5, 6]
    # k beyond the number of classes: everything is within the top k
    assert topk_correct(LOGITS[:, :3], torch.tensor([0, 1, 2, 0, 0, 1]), (1, 5)).tolist() == [3, 6]


def test_evaluate_matches_hand_computed_metrics():
    result = evaluate(LookupModel(LOGITS), indexed_images(6), LABELS, to_float, batch_size=4)
    assert isinstance(result, EvalResult) and result.n == 6
    assert result.top1_error == pytest.approx(5 / 6)
    assert result.top3_error == pytest.approx(3 / 6)
    assert result.top5_error == pytest.approx(1 / 6)
    assert result.loss == pytest.approx(F.cross_entropy(LOGITS, LABELS).item(), rel=1e-6)
    # every image is predicted as class 0
    expected = torch.zeros(6, 6, dtype=torch.int64)
    expected[:, 0] = 1
    assert torch.equal(result.confusion, expected)
    assert result.per_class_accuracy == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert result.summary() == {
        "top1_error": result.top1_error,
        "top3_error": result.top3_error,
        "top5_error": result.top5_error,
        "loss": result.loss,
        "n": 6,
    }


def test_confusion_and_per_class_counts():
    # 3 classes; predictions chosen by hand: class 0 -> 2 of 3 right, class 1 -> 1 of 2, class 2 none
    labels = torch.tensor([0, 0, 0, 1, 1])
    predicted = torch.tensor([0, 0, 2, 1, 0])
    logits = F.one_hot(predicted, 3).float() * 5
    result = evaluate(LookupModel(logits), indexed_images(5), labels, to_float, batch_size=2)
    assert result.confusion.tolist() == [[2, 0, 1], [1, 1, 0], [0, 0, 0]]
    accuracy = result.per_class_accuracy
    assert accuracy[:2] == pytest.approx([2 / 3, 1 / 2]) and math.isnan(accuracy[2])
    assert result.top1_error == pytest.approx(2 / 5)


def test_batch_size_does_not_change_results():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(7))
    images = torch.randint(0, 256, (23, 3, 6, 6), dtype=torch.uint8)
    labels = torch.randint(0, 7, (23,))
    model(to_float(images[:1]))  # materialise the lazy layer
    one = evaluate(model, images, labels, to_float, batch_size=1)
    many = evaluate(model, images, labels, to_float, batch_size=512)
    assert one.topk_errors == many.topk_errors
    assert one.loss == pytest.approx(many.loss, rel=1e-5)
    assert torch.equal(one.confusion, many.confusion)


class Asymmetric(torch.nn.Module):
    """Logits depend on left/right position, so an image and its mirror score differently."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 5 * 5, classes)
        self.bn = torch.nn.BatchNorm1d(classes)

    def forward(self, x):
        return self.bn(self.linear(x.flatten(1)))


@pytest.mark.parametrize("tta,padding", [("flip", "zeros"), ("flip-shift", "zeros"), ("flip-shift", "reflect")])
def test_tta_equals_manual_average_of_logits(tta, padding):
    from resnetlab.data.augment import SHIFT_TTA_OFFSETS, shift

    torch.manual_seed(2)
    model = Asymmetric()
    model.eval()
    images = torch.randint(0, 256, (17, 3, 5, 5), dtype=torch.uint8)
    labels = torch.randint(0, 5, (17,))
    offsets = SHIFT_TTA_OFFSETS if tta == "flip-shift" else ((0, 0),)
    with torch.no_grad():
        x = to_float(images)
        average = torch.stack([model(shift(v, r, c, padding)) for v in (x, x.flip(3)) for r, c in offsets]).mean(dim=0)
    result = evaluate(model, images, labels, to_float, tta=tta, shift_padding=padding, batch_size=5)
    assert result.loss == pytest.approx(F.cross_entropy(average, labels).item(), rel=1e-5)
    for k in (1, 3, 5):
        expected = 1 - topk_correct(average, labels, (k,)).item() / 17
        assert result.topk_errors[k] == pytest.approx(expected)
    plain = evaluate(model, images, labels, to_float, tta="none")
    assert plain.loss != pytest.approx(result.loss)


def test_an_unknown_shift_padding_is_a_clear_error():
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    with pytest.raises(ResnetlabError, match="shift_padding must be one of zeros, reflect"):
        evaluate(Asymmetric(), images, torch.zeros(4, dtype=torch.int64), to_float, tta="flip-shift", shift_padding="wrap")


def test_model_mode_is_restored_and_bf16_autocast_runs():
    model = Asymmetric()
    model.train()
    images = torch.randint(0, 256, (8, 3, 5, 5), dtype=torch.uint8)
    labels = torch.randint(0, 5, (8,))
    fp32 = evaluate(model, images, labels, to_float)
    assert model.training
    bf16 = evaluate(model, images, labels, to_float, precision="bf16")
    assert bf16.loss == pytest.approx(fp32.loss, abs=0.05)


def test_invalid_inputs_raise_clear_errors():
    model = LookupModel(LOGITS)
    with pytest.raises(ResnetlabError, match="tta"):
        evaluate(model, indexed_images(6), LABELS, to_float, tta="ten-crop")
    with pytest.raises(ResnetlabError, match="precision"):
        evaluate(model, indexed_images(6), LABELS, to_float, precision="fp8")
    with pytest.raises(DataError, match="labels"):
        evaluate(model, indexed_images(6), LABELS + 1, to_float)
    with pytest.raises(DataError, match="empty"):
        evaluate(model, indexed_images(0), LABELS[:0], to_float)


def test_confusion_png_is_written_with_class_names(tmp_path):
    from resnetlab.artifacts.confusion import save_confusion_png

    path = save_confusion_png(torch.tensor([[3, 1], [0, 4]]), ["cat", "dog"], tmp_path / "sub" / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["c.png"], "temp file left behind"
    with pytest.raises(ValueError, match="class names"):
        save_confusion_png(torch.zeros(3, 3, dtype=torch.int64), ["cat", "dog"], tmp_path / "bad.png")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_evaluation_syncs_the_same_for_one_batch_or_many():
    """Metrics stay on the GPU: 16 batches cause no more host synchronisations than 1 batch."""
    from resnetlab.models import create_model

    model = create_model("resnet8", num_classes=10).cuda()
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,))

    def run(batch_size):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = evaluate(model, images, labels, to_float, batch_size=batch_size, tta="flip", precision="bf16")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return result, sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)

    run(64)  # warm-up: first calls initialise cuDNN and the caching allocator
    one_batch, syncs_one = run(64)
    many_batches, syncs_many = run(4)
    assert syncs_many == syncs_one
    assert torch.equal(one_batch.confusion, many_batches.confusion)
    reference = evaluate(model.cpu(), images, labels, to_float, tta="flip")
    assert one_batch.loss == pytest.approx(reference.loss, abs=0.05)
