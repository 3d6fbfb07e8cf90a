"""Heatmaps, box extraction on a synthetic map with known blobs, localisation metrics, overlays."""
import json

import numpy as np
import pytest
import torch

from medvlp.finetune.pcam.heatmap import components, heatmaps, largest_box, overlay_png, write_json
from medvlp.finetune.pcam.metrics import LocalisationMeter, box_iou, ground_truth_from_batch, peak_inside


def _blob_map(H=64, W=64, cy=20.0, cx=40.0, r=6.0):
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2))


def test_box_of_a_known_blob():
    heat = _blob_map()
    # heat >= 0.5 <=> distance <= r * sqrt(2 ln 2) = 7.06 px around (x 40, y 20) in pixel centres
    comps = components(heat, 0.5)
    assert len(comps) == 1
    x0, y0, x1, y1 = comps[0]["box"]
    assert (x0, y0, x1, y1) == (33, 13, 47, 27)
    assert comps[0]["peak"] == pytest.approx(heat.max())
    # A second, smaller blob: two components, the larger first; the threshold knob changes the box size.
    heat2 = np.maximum(heat, 0.9 * _blob_map(cy=50, cx=10, r=3))
    comps = components(heat2, 0.5)
    assert [c["box"] for c in comps] == [[33, 13, 47, 27], comps[1]["box"]] and comps[1]["area"] < comps[0]["area"]
    assert 7 <= comps[1]["box"][0] <= 8 and comps[1]["box"][2] <= 13
    big = largest_box(heat, 0.1)
    assert big[0] < 33 and big[2] > 47
    assert components(np.zeros((8, 8)), 0.5) == []
    with pytest.raises(ValueError, match="threshold"):
        components(heat, 1.5)


def test_heatmaps_upsample_and_normalise():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, 1, 2] = 5.0  # cell (row 1, col 2) of a 4x4 map over a 32x32 image
    heat = heatmaps(maps, (32, 32))
    assert heat.shape == (1, 2, 32, 32)
    assert heat[0, 0].max() == 1.0 and heat[0, 0].min() == 0.0
    y, x = np.unravel_index(int(heat[0, 0].argmax()), (32, 32))
    assert 8 <= y < 16 and 16 <= x < 24  # the peak stays inside the cell's pixel block
    assert heat[0, 1].abs().sum() == 0  # a flat map marks nothing


def test_iou_pointing_and_meter():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    heat = torch.from_numpy(_blob_map()).float()
    assert peak_inside(heat, [[35, 15, 45, 25]]) and not peak_inside(heat, [[0, 0, 10, 10]])
    # batch member layout: 2 images, up to 2 boxes, finding index per box, -1 padding
    boxes = torch.tensor([[[34., 14., 46., 26.], [0., 0., 0., 0.]], [[0., 0., 16., 16.], [40., 40., 60., 60.]]])
    gt = ground_truth_from_batch(boxes, torch.tensor([1, 2]), torch.tensor([[0, -1], [1, 0]]))
    assert gt == [[(0, [34., 14., 46., 26.])], [(1, [0., 0., 16., 16.]), (0, [40., 40., 60., 60.])]]
    heat_BKHW = torch.stack([torch.stack([heat, heat]), torch.stack([heat, heat])])
    meter = LocalisationMeter(["a", "b"], threshold=0.5)
    labels = torch.tensor([[1., 0.], [1., 1.]])
    meter.update(torch.tensor([[2.0, -1.0], [0.5, 1.0]]), labels, heat_BKHW, gt)
    s = meter.summary()
    iou0 = box_iou([33, 13, 47, 27], [34, 14, 46, 26])
    assert s["n_loc/a"] == 2 and s["n_loc/b"] == 1
    assert s["pointing/a"] == 0.5 and s["pointing/b"] == 0.0
    assert s["iou/a"] == pytest.approx(iou0 / 2) and s["iou/b"] == 0.0
    assert s["acc@0.5/a"] == 0.5 and s["acc@0.1_mean"] == pytest.approx(0.25)
    assert np.isnan(s["auc/a"])  # one class only
    assert s["auc/b"] == 1.0


def test_overlay_png_and_json(tmp_path):
    from PIL import Image

    img = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    heat = _blob_map()
    p = overlay_png(img, heat, tmp_path / "o.png", boxes=[[33, 13, 47, 27]], gt_boxes=[[34, 14, 46, 26]])
    arr = np.asarray(Image.open(p))
    assert arr.shape == (64, 64, 3)
    assert tuple(arr[13, 40]) == (255, 255, 255) and tuple(arr[14, 40]) == (0, 255, 0)
    assert arr[20, 40, 0] > arr[20, 40, 2] or arr[20, 40, 0] > 200  # hot centre is red-ish
    with pytest.raises(ValueError, match="differ in size"):
        overlay_png(img, heat[:32], tmp_path / "bad.png")
    q = write_json({"a": [1, 2]}, tmp_path / "x" / "b.json")
    assert json.loads(q.read_text()) == {"a": [1, 2]}
