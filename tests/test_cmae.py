"""CMAE (Mao et al.): ContrastiveCrop's boxes and crops, the encoder's tasks, the box store across workers and
resume, and the Tiny-ImageNet layout."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import main_pretrain
from models_mae import MaskedAutoencoderViT
from models_vit import load_pretrained_encoder
from util.cmae_losses import nt_xent_loss, position_cross_entropy
from util.config import parse_with_config
from util.contrastive_crop import (
    BoxStore,
    ContrastiveCrop,
    ContrastiveCropData,
    ContrastiveCropViews,
    box_offset,
    heatmap_boxes,
    interleave_rank_rows,
)
from util.datasets import SeededDataset, build_dataset
from util.registry import create_model

# ---------------------------------------------------------------- boxes from heat maps


def test_blob_gives_its_bounding_box():
    heat = torch.zeros(1, 8, 8)
    heat[0, 2:5, 3:7] = 1.0  # rows 2-4, columns 3-6
    expected = torch.tensor([[2 / 8, 3 / 8, 4 / 8, 6 / 8]])
    assert torch.equal(heatmap_boxes(heat, (8, 8)), expected)  # same size: no interpolation
    assert torch.equal(heatmap_boxes(heat * 5 + 3, (8, 8)), expected)  # min-max normalised: offset and scale do not matter
    # Upsampled x4 (align_corners=False): output row y samples source row (y + 0.5) / 4 - 0.5, where the edge
    # ramps from 0 (row 1) to 1 (row 2); > 0.1 from y = 6 on. Likewise the bottom (y <= 21), left (10), right (29).
    assert torch.equal(heatmap_boxes(heat, (32, 32)), torch.tensor([[6 / 32, 10 / 32, 21 / 32, 29 / 32]]))


def test_threshold_edge_cases():
    heat = torch.tensor([[[0.0, 0.1, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    # a value equal to the threshold is not above it; the peak alone remains
    assert torch.equal(heatmap_boxes(heat, (3, 3), threshold=0.1), torch.tensor([[2 / 3, 2 / 3, 2 / 3, 2 / 3]]))
    assert torch.equal(heatmap_boxes(heat, (3, 3), threshold=0.05), torch.tensor([[0.0, 1 / 3, 2 / 3, 2 / 3]]))
    # nothing above the threshold (constant maps, all-equal zeros): the full box
    flat = torch.stack([torch.full((3, 3), 7.0), torch.zeros(3, 3)])
    assert torch.equal(heatmap_boxes(flat, (3, 3)), torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2))
    # threshold 0: every row and column holding more than the minimum
    assert torch.equal(heatmap_boxes(heat, (3, 3), threshold=0.0), torch.tensor([[0.0, 1 / 3, 2 / 3, 2 / 3]]))


def test_boxes_match_a_loop_over_rows_and_columns():
    torch.manual_seed(0)
    heat = torch.randn(5, 4, 4).exp()
    size, threshold = (12, 10), 0.4
    boxes = heatmap_boxes(heat, size, threshold)
    for n in range(5):
        m = heat[n].numpy().astype(np.float64)
        m = (m - m.min()) / (m - m.min()).max()
        up = F.interpolate(torch.from_numpy(m)[None, None].float(), size=size, mode="bilinear").numpy()[0, 0]
        rows = [r for r in range(size[0]) if max(up[r, c] for c in range(size[1])) > threshold]
        cols = [c for c in range(size[1]) if max(up[r, c] for r in range(size[0])) > threshold]
        expected = [min(rows) / size[0], min(cols) / size[1], max(rows) / size[0], max(cols) / size[1]]
        assert boxes[n].tolist() == pytest.approx(expected, abs=1e-7)


def test_rank_shards_are_put_back_in_dataset_order():
    for total, world in ((10, 3), (7, 2), (4, 4), (5, 1)):
        shards = [list(DistributedSampler(range(total), num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
        gathered = torch.tensor([index for shard in shards for index in shard])  # all_gather: rank order
        assert interleave_rank_rows(gathered, world, total).tolist() == list(range(total))


# ---------------------------------------------------------------- crops


def test_box_offset_stays_in_the_image_and_centres_in_the_box():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        extent = int(rng.integers(8, 300))
        crop = int(rng.integers(1, extent + 1))
        lo, hi = np.sort(rng.uniform(0, 1, 2))
        beta = float(rng.uniform())
        edge = box_offset(extent, crop, lo, hi, beta)
        assert 0 <= edge <= extent - crop
        centre = edge + crop // 2
        unclipped = math.floor(extent * lo) - crop // 2 >= 0 and math.floor(extent * hi) - crop // 2 <= extent - crop
        if unclipped:
            assert math.floor(extent * lo) <= centre <= math.floor(extent * hi)
    assert box_offset(100, 20, 0.0, 1.0, 0.0) == 0 and box_offset(100, 20, 0.0, 1.0, 1.0) == 80
    assert box_offset(100, 20, 0.5, 0.5, 0.7) == 40  # a point box: the crop centred on it


def test_crops_stay_inside_the_image():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    crop = ContrastiveCrop(16, alpha=0.1)
    for _ in range(1000):
        height, width = (int(v) for v in rng.integers(4, 200, 2))
        top, left = np.sort(rng.uniform(0, 1, 2)), np.sort(rng.uniform(0, 1, 2))
        i, j, h, w = crop.get_params(height, width, (top[0], left[0], top[1], left[1]))
        assert 0 <= i and i + h <= height and 0 <= j and j + w <= width and h > 0 and w > 0


def _ks_statistic(samples: np.ndarray, cdf) -> float:
    samples = np.sort(samples)
    n = len(samples)
    values = cdf(samples)
    return float(max((np.arange(1, n + 1) / n - values).max(), (values - np.arange(n) / n).max()))


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_crop_centres_follow_the_beta_law(alpha):
    """Kolmogorov-Smirnov against Beta(alpha, alpha) in closed form: arcsine law for 0.5, 3x^2 - 2x^3 for 2.

    A 200-px crop of a 1000-px image with the full box: the top edge is floor(800 beta), its fraction of 800
    is beta up to 1/800; n = 4000 draws, 1% critical value 1.63 / sqrt(n) = 0.026."""
    cdfs = {0.5: lambda x: 2 / np.pi * np.arcsin(np.sqrt(x)), 2.0: lambda x: 3 * x**2 - 2 * x**3}
    torch.manual_seed(0)
    crop = ContrastiveCrop(32, alpha=alpha, scale=(0.04, 0.04), ratio=(1.0, 1.0))
    params = np.array([crop.get_params(1000, 1000, (0.0, 0.0, 1.0, 1.0)) for _ in range(4000)])
    assert (params[:, 2:] == 200).all()
    critical = 1.63 / np.sqrt(len(params))
    for edge in (params[:, 0], params[:, 1]):
        fractions = edge / 800
        assert _ks_statistic(fractions, cdfs[alpha]) < critical
        other = cdfs[2.0 if alpha == 0.5 else 0.5]
        assert _ks_statistic(fractions, other) > 5 * critical  # the test tells the two laws apart


# ---------------------------------------------------------------- the box store across workers


class _HalfDark(Dataset):
    """64x64 images, left half black, right half white."""

    num_classes = 0

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        pixels = np.zeros((64, 64, 3), np.uint8)
        pixels[:, 32:] = 255
        return Image.fromarray(pixels), index


LEFT, RIGHT = (0.5, 0.25, 0.5, 0.25), (0.5, 0.75, 0.5, 0.75)  # point boxes in the middle of each half


@pytest.mark.parametrize("persistent", [False, True])
def test_box_updates_reach_every_worker(persistent):
    """Tiny crops (about 6 px) centred on a point box are all black on the left, all white on the right."""
    store = BoxStore(8)
    views = ContrastiveCropViews(_HalfDark(), store, size=8, alpha=1.0, scale=(0.01, 0.01))
    train_set = SeededDataset(views, seed=0)
    loader = DataLoader(train_set, batch_size=2, num_workers=2, persistent_workers=persistent)
    store.active.fill_(True)
    for epoch, box, sign in ((0, LEFT, -1), (1, RIGHT, 1), (2, LEFT, -1)):
        store.update(torch.tensor([box] * 8))
        train_set.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 4  # both workers served batches
        for imgs, _ in batches:
            assert imgs.shape == (2, 2, 3, 8, 8)
            assert (torch.sign(imgs.mean(dim=(2, 3, 4))) == sign).all(), f"epoch {epoch}: a worker used stale boxes"


def test_box_schedule_follows_the_official_one():
    def schedule(epochs, warmup, freq):
        args = _data_args(epochs=epochs, box_warmup=warmup, box_update_freq=freq)
        data = ContrastiveCropData(args)
        return ([e for e in range(epochs) if data.uses_boxes(e)], [e for e in range(epochs) if data.updates_after(e)])

    # CIFAR's release: 500 epochs, warm-up 100, interval 100: boxes from the 101st epoch, updated after the
    # 100th, 200th, 300th and 400th (0-based 99, ...), not after the last
    used, updated = schedule(500, 100, 100)
    assert used == list(range(100, 500)) and updated == [99, 199, 299, 399]
    assert schedule(3, 1, 1) == ([1, 2], [0, 1])
    data = ContrastiveCropData(_data_args(epochs=400, box_warmup=None, box_update_freq=None))
    assert (data.warmup, data.update_freq) == (80, 80)  # 20% of the epochs


def _data_args(**overrides):
    args = main_pretrain.get_args_parser().parse_args(["--model", "cmae_vit_tiny_patch4", "--input_size", "32"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


# ---------------------------------------------------------------- the encoder's tasks


def test_nt_xent_equals_a_plain_loop():
    torch.manual_seed(0)
    u1, u2 = F.normalize(torch.randn(5, 7), dim=1), F.normalize(torch.randn(5, 7), dim=1)
    tau = 0.2
    loss, accuracy = nt_xent_loss(u1, u2, tau)
    u = torch.cat([u1, u2]).double()
    total, correct = 0.0, 0
    for i in range(10):
        partner = (i + 5) % 10
        others = [k for k in range(10) if k != i]
        denominator = sum(math.exp(float(u[i] @ u[k]) / tau) for k in others)
        total += -math.log(math.exp(float(u[i] @ u[partner]) / tau) / denominator)
        correct += max(others, key=lambda k: float(u[i] @ u[k])) == partner
    assert loss.item() == pytest.approx(total / 10, rel=1e-5)
    assert accuracy.item() == pytest.approx(100 * correct / 10)


def test_position_cross_entropy_equals_a_plain_loop():
    torch.manual_seed(0)
    logits, positions = torch.randn(3, 4, 16), torch.randint(0, 16, (3, 4))
    loss, accuracy = position_cross_entropy(logits, positions)
    expected = np.mean([-torch.log_softmax(logits[r, q].double(), 0)[positions[r, q]].item()
                        for r in range(3) for q in range(4)])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    hits = [logits[r, q].argmax().item() == positions[r, q].item() for r in range(3) for q in range(4)]
    assert accuracy.item() == pytest.approx(100 * np.mean(hits))


def _tiny_cmae(**kwargs):
    torch.manual_seed(0)
    return create_model("cmae_vit_tiny_patch4", img_size=16, depth=2, decoder_depth=1, norm_pix_loss=True, **kwargs)


def test_withheld_tokens_get_no_positional_embedding():
    """The encoder's input at withheld patches is patch embedding + no_pos_embed exactly, and the position
    head's inputs for identical patches are identical, whatever their positions."""
    model = _tiny_cmae(pos_ratio=0.5)  # 16 patches, 4 visible, 2 withheld per view
    captured = {}
    model.pos_head.register_forward_hook(lambda module, inputs, output: captured.update(z=inputs[0]))
    encode = model.encode
    model.encode = lambda tokens, ids_keep: captured.update(tokens=tokens, ids_keep=ids_keep) or encode(tokens, ids_keep)
    imgs = torch.ones(3, 2, 3, 16, 16)  # every patch the same
    model(imgs)
    views = imgs.transpose(0, 1).flatten(0, 1)
    patches = model.patch_embed(views)
    withheld, shown = captured["ids_keep"][:, :2], captured["ids_keep"][:, 2:]
    for row in range(6):
        for index in withheld[row]:
            assert torch.equal(captured["tokens"][row, index], patches[row, index] + model.no_pos_embed[0, 0])
        for index in shown[row]:
            assert torch.equal(captured["tokens"][row, index], patches[row, index] + model.pos_embed[0, 1 + index])
    z = captured["z"]  # (6, 2, D): identical inputs, no position: identical encoder outputs
    torch.testing.assert_close(z[:, 0], z[:, 1], atol=1e-5, rtol=0)
    # the same check fails when the positions leak in: it can fail
    model.embed_patches_withholding = lambda imgs, withheld: MaskedAutoencoderViT.embed_patches(model, imgs)
    model(imgs)
    assert (captured["z"][:, 0] - captured["z"][:, 1]).abs().max() > 1e-3


def test_reconstruction_is_the_mean_of_the_two_views_mae_losses():
    model = _tiny_cmae(pos_task="none", con_weight=0.0)
    imgs, noise = torch.randn(3, 2, 3, 16, 16), torch.rand(3, 32)
    first = MaskedAutoencoderViT.forward(model, imgs[:, 0], noise[:, :16]).loss
    second = MaskedAutoencoderViT.forward(model, imgs[:, 1], noise[:, 16:]).loss
    output = model(imgs, noise)
    assert output.loss.item() == pytest.approx((first.item() + second.item()) / 2, rel=1e-5)
    assert set(output.terms) == {"rec"}
    model.rec_views = 1
    assert model(imgs, noise).loss.item() == pytest.approx(first.item(), rel=1e-5)


def test_total_loss_weights_terms_and_checkpoint_fine_tunes():
    model = _tiny_cmae(con_weight=0.5, pos_weight=2.0)
    output = model(torch.randn(4, 2, 3, 16, 16))
    terms = output.terms
    assert {"rec", "con", "con_acc", "pos", "pos_acc"} <= set(terms)
    assert output.loss.item() == pytest.approx((terms["rec"] + 0.5 * terms["con"] + 2.0 * terms["pos"]).item(), rel=1e-5)
    assert output.features.shape == (4, 192)
    with pytest.raises(ValueError, match=r"two views per image, \(B, 2, C, H, W\)"):
        model(torch.randn(4, 3, 16, 16))
    assert model.patch_heatmaps(torch.randn(2, 3, 16, 16)).shape == (2, 4, 4)
    vit = create_model("vit_tiny_patch4", img_size=16, depth=2, num_classes=3)
    assert set(load_pretrained_encoder(vit, model.state_dict())) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


def test_bad_flags_are_named(tmp_path, capsys):
    parser = main_pretrain.get_args_parser()
    for flags, name in ((["--crop_alpha", "0"], "--crop_alpha"), (["--pos_ratio", "1.5"], "--pos_ratio"),
                        (["--decoder_num_heads", "3"], "--decoder_num_heads"), (["--box_update_freq", "0"], "--box_update_freq")):
        with pytest.raises(SystemExit):
            main_pretrain.validate_args(parser.parse_args(["--model", "cmae_vit_tiny_patch4", "--data_path", str(tmp_path), *flags]), parser)
        assert name in capsys.readouterr().err


# ---------------------------------------------------------------- Tiny-ImageNet and a whole run


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory) -> Path:
    """The official layout in miniature: 2 classes x 8 train images (a bright square on a dark ground, 32 px),
    3 val images listed in val_annotations.txt; wnids.txt and the train boxes files as in the release."""
    root = tmp_path_factory.mktemp("data") / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    wnids = ["n01443537", "n01629819"]

    def image(path: Path, label: int) -> None:
        pixels = rng.integers(0, 60, (32, 32, 3))
        top, left = rng.integers(0, 16, 2)
        pixels[top:top + 16, left:left + 16] = 180 + 40 * label
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path)

    for label, wnid in enumerate(wnids):
        for i in range(8):
            image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", label)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i, label in enumerate([1, 0, 1]):
        image(root / "val" / "images" / f"val_{i}.JPEG", label)
        lines.append(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    return root


def test_tiny_imagenet_layout(tiny_imagenet, tmp_path):
    train = build_dataset("tiny_imagenet", str(tiny_imagenet), "train", None)
    val = build_dataset("tiny_imagenet", str(tiny_imagenet.parent), "val", None)  # the folder holding it works too
    assert (len(train), train.num_classes, len(val), val.num_classes) == (16, 2, 3, 2)
    assert [label for _, label in train.samples] == [0] * 8 + [1] * 8
    assert [label for _, label in val.samples] == [1, 0, 1]
    img, label = val[1]
    assert img.mode == "RGB" and img.size == (32, 32) and label == 0
    broken = tmp_path / "tiny-imagenet-200"
    shutil.copytree(tiny_imagenet, broken)
    (broken / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"val_annotations.txt, line 1: class n99999999 has no folder"):
        build_dataset("tiny_imagenet", str(broken), "val", None)
    (broken / "val" / "val_annotations.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val_annotations.txt not found"):
        build_dataset("tiny_imagenet", str(broken), "val", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="official tiny-imagenet-200 layout"):
        build_dataset("tiny_imagenet", str(tmp_path / "empty"), "train", None)


def _run(data: Path, out: Path, epochs: int = 3):
    flags = {"model": "cmae_vit_tiny_patch4", "dataset": "tiny_imagenet", "data_path": data, "output_dir": out,
             "input_size": 32, "batch_size": 4, "epochs": epochs, "warmup_epochs": 1, "blr": 1e-3, "num_workers": 2,
             "amp": "none", "save_freq": 1, "vis_freq": 0, "print_freq": 2, "seed": 1, "device": "cpu",
             "box_warmup": 1, "box_update_freq": 1, "box_heatmap": "norm", "box_threshold": 0.6}
    argv = [item for key, value in flags.items() for item in (f"--{key}", str(value))] + ["--norm_pix_loss"]
    return main_pretrain.main(parse_with_config(main_pretrain.get_args_parser(), argv))


@pytest.fixture(scope="module")
def straight_run(tiny_imagenet, tmp_path_factory, shallow_models_module) -> Path:
    out = tmp_path_factory.mktemp("cmae_run")
    _run(tiny_imagenet, out)
    return out


@pytest.fixture(scope="module")
def shallow_models_module():
    with pytest.MonkeyPatch.context() as patch:
        from util.registry import create_model as create

        patch.setattr(main_pretrain, "create_model", lambda name, **kw: create(name, **{**kw, "depth": 1, "decoder_depth": 1}))
        yield


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_run_logs_every_term_and_box_statistics(straight_run):
    log = _log(straight_run)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    for record in log:
        assert {"train_rec", "train_con", "train_con_acc", "train_pos", "train_pos_acc", "box_area_mean",
                "box_height_mean", "box_width_mean"} <= set(record)
    assert [r["box_updated"] for r in log] == [1, 1, 0]  # after epochs 0 and 1, not after the last
    assert log[0]["sequences_seen"] == 2 * log[0]["images_seen"]
    boxes = torch.load(straight_run / "checkpoint-last.pth", weights_only=True)["train_data"]["boxes"]
    assert boxes.shape == (16, 4) and (boxes[:, :2] <= boxes[:, 2:]).all()
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean().item()
    assert area == pytest.approx(log[-1]["box_area_mean"])
    assert area < 0.9, "the boxes stayed full: the resume test below would not see lost boxes"


def test_boxes_survive_resume(straight_run, tiny_imagenet, tmp_path, shallow_models_module):
    """3 epochs straight == 2 epochs, then resuming for the third: the crops of the third use the boxes computed
    after the second, which only the checkpoint holds."""
    shutil.copy(straight_run / "checkpoint-1.pth", tmp_path / "checkpoint-last.pth")
    (tmp_path / "log.txt").write_text("".join(line + "\n" for line in (straight_run / "log.txt").read_text().splitlines()[:2]))
    _run(tiny_imagenet, tmp_path)
    straight = torch.load(straight_run / "checkpoint-last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert torch.equal(resumed["train_data"]["boxes"], straight["train_data"]["boxes"])
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), f"{key} differs after resume"
    def timeless(out):
        return [{k: v for k, v in record.items() if k != "epoch_time_s"} for record in _log(out)]

    assert timeless(tmp_path) == timeless(straight_run)
