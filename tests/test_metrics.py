"""Run output: grouped TensorBoard tags, counters written only when they change, flat metrics.jsonl,
console lines on stderr, and the order images (drawn with matplotlib, or the plain fallback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lomdm_dist.train import order_images
from lomdm_dist.train.metrics import MetricsLogger, print0, tensorboard_tag


def test_tags_are_grouped_by_key():
    expected = {
        "loss": "train/loss", "nelbo": "train/nelbo", "l_velocity": "train/l_velocity", "lr": "train/lr",
        "grad_norm": "train/grad_norm", "masked_fraction": "train/masked_fraction",
        "val_nelbo": "val/nelbo", "val_ppl": "val/ppl", "val_tokens": "val/tokens",
        "k_phi_mean": "order/k_phi_mean", "k_hat_mean": "order/k_hat_mean",
        # diagnostics added to the objective later land in order/ by their prefix
        "k_phi_std": "order/k_phi_std", "k_hat_std": "order/k_hat_std", "g_phi_saturated": "order/g_phi_saturated",
        "g_psi_mean": "order/g_psi_mean", "order_entropy": "order/order_entropy",
        "tokens_per_sec": "system/tokens_per_sec", "tokens_per_sec_per_device": "system/tokens_per_sec_per_device",
        "mfu": "system/mfu", "peak_mem_gb": "system/peak_mem_gb", "epoch": "system/epoch",
        "nonfinite_skipped": "system/nonfinite_skipped", "corrupt_shards_skipped": "system/corrupt_shards_skipped",
    }
    assert {key: tensorboard_tag(key) for key in expected} == expected


def test_counters_reach_tensorboard_only_when_they_change(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path)
    for step, skipped in ((1, 0), (2, 0), (3, 1), (4, 1)):
        logger.log(step, {"loss": 1.0 / step, "epoch": 0, "nonfinite_skipped": skipped, "samples_seen": 4 * step})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("system/epoch")] == [1]
    assert [(e.step, e.value) for e in events.Scalars("system/nonfinite_skipped")] == [(1, 0.0), (3, 1.0)]
    assert "system/samples_seen" not in events.Tags()["scalars"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(line) for line in lines] == [["epoch", "loss", "nonfinite_skipped", "samples_seen", "step"]] * 4


def test_print0_writes_to_stderr_on_rank_0_only(capfd):
    print0("a", 1, rank=0)
    print0("hidden", rank=1)
    out, err = capfd.readouterr()
    assert out == "" and err == "a 1\n"


def test_order_images_are_labelled_colour_pictures():
    k = 0.7 + 0.6 * torch.linspace(-1, 1, 8 * 64).reshape(8, 64)
    valid = torch.ones(8, 64, dtype=torch.bool)
    valid[0, 40:] = False
    image = order_images.priority_image(k, valid, c1=0.7, c2=0.65)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] >= 8 * 16 and image.shape[1] >= 64 * 6        # far larger than the 8 x 64 matrix
    assert (image[..., 0] != image[..., 2]).any()                          # coloured
    order = order_images.generation_order_image(torch.randint(0, 9, (2, 64)), steps=8)
    assert order.dtype == np.uint8 and order.shape[2] == 3 and order.shape[0] >= 100


def test_order_images_without_matplotlib_are_scaled_grey_blocks(monkeypatch):
    monkeypatch.setattr(order_images, "_matplotlib", lambda: None)
    k = torch.tensor([[0.05, 1.35], [0.7, 0.7]])
    image = order_images.priority_image(k, torch.ones(2, 2, dtype=torch.bool), c1=0.7, c2=0.65)
    cell = order_images.CELL_PIXELS
    assert image.shape == (2 * cell, 2 * cell, 3)
    assert image[0, 0, 0] == 0 and image[0, cell, 0] == 255 and image[cell, 0, 0] == 128
    assert (image[..., 0] == image[..., 2]).all()


def test_heatmap_rejects_a_non_matrix():
    with pytest.raises(ValueError, match="rows, positions"):
        order_images.heatmap(torch.zeros(5), low=0, high=1, title="", colorbar_label="", row_label="")
