"""tools/export.py: every method's checkpoint, a fine-tuned one and an official-format one, to every format.

timm and the hf folder are checked against timm itself (strict loads, offline, features equal to our models_vit);
ViTDet and mmsegmentation, which do not install here, against their key names and shapes, written out below
from their model definitions (detectron2/modeling/backbone/vit.py, configs/common/models/mask_rcnn_vitdet.py;
mmseg/models/backbones/mae.py and beit.py, configs/mae), as test_models.py does for MAE's own keys.
"""
import hashlib
import json
import struct
from pathlib import Path

import pytest
import timm
import torch
from conftest import run_script
from safetensors.torch import load_file
from test_models import official_mae_vit_base_shapes
from timm.data import resolve_data_config

from tools import export
from util.checkpoint import load_checkpoint, model_state_from
from util.pos_embed import interpolate_pos_embed
from util.registry import create_model

DEPTH = 2  # our tiny models at two blocks: small files, the real widths
PRETRAIN_MODELS = ("mae_vit_tiny_patch4", "mi_mae_vit_tiny_patch4", "u_mae_vit_tiny_patch4", "m_mae_vit_tiny_patch4",
                   "cmae_vit_tiny_patch4")
CHECKPOINTS = (*PRETRAIN_MODELS, "finetuned", "probed", "official")
TIMM_FORMATS = ("timm", "safetensors", "hf")


def randomized(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every float tensor redrawn (zero biases and unit norms would hide a swapped key)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=generator) * 0.2 if v.is_floating_point() else v) for k, v in state.items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Files in each source layout: our pre-training checkpoints (model + args), our fine-tuning (global pool,
    fc_norm, head) and probing (cls token, BatchNorm head) checkpoints, and MAE's release format (model only)."""
    folder = tmp_path_factory.mktemp("sources")
    paths = {}
    for seed, name in enumerate(PRETRAIN_MODELS):
        model = create_model(name, depth=DEPTH, decoder_depth=1)
        paths[name] = folder / f"{name}.pth"
        torch.save({"model": randomized(model.state_dict(), seed), "args": {"model": name, "input_size": 32}, "epoch": 3},
                   paths[name])
    for seed, (name, global_pool) in enumerate((("finetuned", True), ("probed", False)), start=10):
        vit = create_model("vit_tiny_patch4", depth=DEPTH, num_classes=10, global_pool=global_pool)
        if name == "probed":
            vit.head = torch.nn.Sequential(torch.nn.BatchNorm1d(192, affine=False), vit.head)
        paths[name] = folder / f"{name}.pth"
        torch.save({"model": randomized(vit.state_dict(), seed),
                    "args": {"model": "vit_tiny_patch4", "finetune": str(paths["mae_vit_tiny_patch4"])}}, paths[name])
    mae = create_model("mae_vit_tiny_patch4", depth=DEPTH, decoder_depth=1)
    paths["official"] = folder / "mae_visualize_vit_tiny.pth"
    torch.save({"model": randomized(mae.state_dict(), 20)}, paths["official"])
    return paths


def run_export(source: Path, target: str, folder: Path, input_size: int | None = None) -> dict:
    output = folder / (target if target == "hf" else f"{target}.{'safetensors' if target == 'safetensors' else 'pth'}")
    argv = [str(source), "--format", target, "--output", str(output)]
    return export.main(argv + (["--input_size", str(input_size)] if input_size else []))


def read_export(record: dict) -> dict[str, torch.Tensor]:
    output = Path(record["output"])
    if record["format"] == "hf":
        return load_file(output / "model.safetensors")
    if record["format"] == "safetensors":
        return load_file(output)
    state = torch.load(output, map_location="cpu", weights_only=True)
    return state["model"] if record["format"] == "vitdet" else state


# ---------------------------------------------------------------- timm: strict loads and the same features as ours


def timm_model(record: dict) -> torch.nn.Module:
    """timm's model from the export, as a user loads it: strictly, and for hf through timm's offline folder loader."""
    if record["format"] == "hf":
        return timm.create_model(f"local-dir:{record['output']}", pretrained=True).eval()
    args = record["timm"]
    model = timm.create_model(args["architecture"], num_classes=0, **args["model_args"])
    model.load_state_dict(read_export(record), strict=True)
    return model.eval()


def our_vit(source: Path, input_size: int) -> torch.nn.Module:
    """models_vit's network on the source's own weights (the position table resized as fine-tuning does)."""
    state = dict(model_state_from(load_checkpoint(source)))
    global_pool = "fc_norm.weight" in state
    vit = create_model("vit_tiny_patch4", depth=DEPTH, num_classes=0, global_pool=global_pool, img_size=input_size)
    state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], vit.patch_embed.num_patches)
    vit.load_state_dict({k: v for k, v in state.items() if k in vit.state_dict()}, strict=True)
    return vit.eval()


@pytest.mark.parametrize("input_size", [None, 48])
@pytest.mark.parametrize("target", TIMM_FORMATS)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_timm_exports_load_strictly_and_give_our_features(checkpoints, name, target, input_size, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hf folder loads without the Hub
    record = run_export(checkpoints[name], target, tmp_path, input_size)
    size = input_size or 32
    assert record["input_size"] == size and record["timm"]["architecture"] == "vit_tiny_patch16_224"
    theirs, ours = timm_model(record), our_vit(checkpoints[name], size)
    exported = read_export(record)
    for key, value in theirs.state_dict().items():  # what timm holds is exactly the export
        assert torch.equal(value, exported[key]), key
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens_theirs, tokens_ours = theirs.forward_features(images), ours.forward_features(images)
        pooled_theirs, pooled_ours = theirs(images), ours(images)
    assert tokens_theirs.shape == (3, 1 + (size // 4) ** 2, 192) and pooled_theirs.shape == (3, 192)
    assert (tokens_theirs - tokens_ours).abs().max() <= 1e-5
    assert (pooled_theirs - pooled_ours).abs().max() <= 1e-5


def test_timm_file_loads_through_timm_pretrained_path(checkpoints, tmp_path):
    """The printed hint: timm's own pretrained loader with a local file (strict, since num_classes agree)."""
    record = run_export(checkpoints["mi_mae_vit_tiny_patch4"], "timm", tmp_path)
    args = record["timm"]
    model = timm.create_model(args["architecture"], num_classes=0, pretrained=True, **args["model_args"],
                              pretrained_cfg_overlay=dict(file=record["output"], num_classes=0))
    exported = read_export(record)
    assert model.state_dict().keys() == exported.keys()
    assert all(torch.equal(value, exported[key]) for key, value in model.state_dict().items())


def test_hf_folder_carries_timm_config(checkpoints, tmp_path):
    record = run_export(checkpoints["finetuned"], "hf", tmp_path)
    config = json.loads((Path(record["output"]) / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["model_args"] == {"img_size": 32, "patch_size": 4, "depth": DEPTH, "global_pool": "avg"}
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    model = timm.create_model(f"local-dir:{record['output']}", pretrained=True)
    assert model.global_pool == "avg" and isinstance(model.norm, torch.nn.Identity)
    assert resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)


# ---------------------------------------------------------------- safetensors: the plain file, round trip


def test_safetensors_round_trip(checkpoints, tmp_path):
    source = checkpoints["u_mae_vit_tiny_patch4"]
    record = run_export(source, "safetensors", tmp_path / "a")
    reference = run_export(source, "timm", tmp_path / "b")
    loaded, expected = read_export(record), read_export(reference)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    # the format itself: an 8-byte little-endian header length, a JSON header, raw little-endian bytes; no pickle
    raw = Path(record["output"]).read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_length])
    assert header["__metadata__"]["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    start, end = header["blocks.1.mlp.fc2.weight"]["data_offsets"]
    assert header["blocks.1.mlp.fc2.weight"]["dtype"] == "F32" and header["blocks.1.mlp.fc2.weight"]["shape"] == [192, 768]
    values = torch.frombuffer(bytearray(raw[8 + header_length + start:8 + header_length + end]), dtype=torch.float32)
    assert torch.equal(values.view(192, 768), expected["blocks.1.mlp.fc2.weight"])


# ---------------------------------------------------------------- every source to every format, the record


@pytest.mark.parametrize("target", export.FORMATS)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_every_source_to_every_format(checkpoints, name, target, tmp_path):
    record = run_export(checkpoints[name], target, tmp_path)
    output = Path(record["output"])
    record_file = output / "export.json" if target == "hf" else output.with_name(output.stem + ".export.json")
    assert json.loads(record_file.read_text()) == json.loads(json.dumps(record))
    assert record["source_sha256"] == hashlib.sha256(checkpoints[name].read_bytes()).hexdigest()
    expected_method = {"mae_vit_tiny_patch4": "MAE", "mi_mae_vit_tiny_patch4": "MI-MAE", "u_mae_vit_tiny_patch4": "U-MAE",
                       "m_mae_vit_tiny_patch4": "M-MAE", "cmae_vit_tiny_patch4": "CMAE (Mao)",
                       "official": "MAE (official release format)"}
    if name in expected_method:
        assert record["method"] == expected_method[name]
    else:
        assert record["method"].startswith("fine-tuned or probed from") and record["model"] == "vit_tiny_patch4"
    assert record["encoder"]["size"] == "vit_tiny_patch4" and record["encoder"]["depth"] == DEPTH
    # nothing but the encoder: every source tensor is either the exported one, under the recorded name, or dropped
    source_state = model_state_from(load_checkpoint(checkpoints[name]))
    exported = read_export(record)
    for source_key, target_key in record["mapping"].items():
        if target_key is not None:
            assert torch.equal(exported[target_key], source_state[source_key]), source_key
    assert set(exported) == {v for v in record["mapping"].values() if v} | set(record["added"])
    never_exported = ("decoder", "mask_token", "mi_projector", "variational", "con_projector", "pos_head",
                      "no_pos_embed", "head")
    assert not [k for k in record["mapping"] if k.startswith(never_exported)]
    assert set(record["dropped_from_source"]) >= {k.split(".")[0] for k in source_state if k.startswith(never_exported)}
    shapes = {key: tuple(value.shape) for key, value in exported.items()}
    if target == "vitdet":
        assert_fits_target(shapes, vitdet_shapes(192, DEPTH, 3, 4, img_size=64, pretrain_img_size=32, window_size=4,
                                                 window_block_indexes=(0,)), VITDET_LEFT_TO_TARGET)
    if target == "mmseg":
        assert_fits_target(shapes, mmseg_mae_shapes(192, DEPTH, 3, 4, img_size=32), MMSEG_LEFT_TO_TARGET)


def test_cli_prints_how_to_load_and_refuses_bad_input_size(checkpoints, tmp_path):
    out = tmp_path / "cmae_vitdet.pth"
    result = run_script(["tools/export.py", str(checkpoints["cmae_vit_tiny_patch4"]), "--format", "vitdet", "--output",
                         str(out), "--input_size", "64"])
    assert "CMAE (Mao)" in result.stdout and "pretrain_img_size=64" in result.stdout
    assert torch.load(out, weights_only=True)["model"]["backbone.net.pos_embed"].shape == (1, 1 + 16 * 16, 192)
    with pytest.raises(SystemExit, match=r"--input_size 30: must be a positive multiple of the patch size 4"):
        export.main([str(checkpoints["official"]), "--format", "timm", "--output", str(tmp_path / "x.pth"), "--input_size", "30"])
    not_vit = tmp_path / "not_vit.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, not_vit)
    with pytest.raises(SystemExit, match=r"not_vit.pth: no 'cls_token': not a ViT/MAE checkpoint"):
        export.main([str(not_vit), "--format", "timm", "--output", str(tmp_path / "y.pth")])


# ---------------------------------------------------------------- ViTDet and mmsegmentation: the targets' key lists


def vitdet_shapes(dim: int, depth: int, heads: int, patch: int, img_size: int, pretrain_img_size: int, window_size: int,
                  window_block_indexes: tuple[int, ...], out_channels: int = 256) -> dict[str, tuple]:
    """Every parameter of detectron2's SimpleFeaturePyramid(ViT(...), scale_factors=(4, 2, 1, 0.5), norm="LN"),
    written out from vit.py: the ViT (no cls token, no final norm; pos_embed with the cls slot at the pre-training
    size; decomposed relative positions per block, at the window size or the full grid) and the pyramid."""
    net = "backbone.net."
    shapes = {net + "patch_embed.proj.weight": (dim, 3, patch, patch), net + "patch_embed.proj.bias": (dim,),
              net + "pos_embed": (1, (pretrain_img_size // patch) ** 2 + 1, dim)}
    for i in range(depth):
        block, rel = f"{net}blocks.{i}.", window_size if i in window_block_indexes else img_size // patch
        shapes.update({
            block + "norm1.weight": (dim,), block + "norm1.bias": (dim,),
            block + "attn.qkv.weight": (3 * dim, dim), block + "attn.qkv.bias": (3 * dim,),
            block + "attn.proj.weight": (dim, dim), block + "attn.proj.bias": (dim,),
            block + "attn.rel_pos_h": (2 * rel - 1, dim // heads), block + "attn.rel_pos_w": (2 * rel - 1, dim // heads),
            block + "norm2.weight": (dim,), block + "norm2.bias": (dim,),
            block + "mlp.fc1.weight": (4 * dim, dim), block + "mlp.fc1.bias": (4 * dim,),
            block + "mlp.fc2.weight": (dim, 4 * dim), block + "mlp.fc2.bias": (dim,)})
    out = out_channels

    def conv_ln(prefix: str, in_channels: int, kernel: int) -> dict[str, tuple]:  # Conv2d(bias=False, norm=LN)
        return {prefix + ".weight": (out, in_channels, kernel, kernel), prefix + ".norm.weight": (out,), prefix + ".norm.bias": (out,)}

    pyramid = {"simfp_2.0.weight": (dim, dim // 2, 2, 2), "simfp_2.0.bias": (dim // 2,), "simfp_2.1.weight": (dim // 2,),
               "simfp_2.1.bias": (dim // 2,), "simfp_2.3.weight": (dim // 2, dim // 4, 2, 2), "simfp_2.3.bias": (dim // 4,),
               **conv_ln("simfp_2.4", dim // 4, 1), **conv_ln("simfp_2.5", out, 3),
               "simfp_3.0.weight": (dim, dim // 2, 2, 2), "simfp_3.0.bias": (dim // 2,),
               **conv_ln("simfp_3.1", dim // 2, 1), **conv_ln("simfp_3.2", out, 3),
               **conv_ln("simfp_4.0", dim, 1), **conv_ln("simfp_4.1", out, 3),
               **conv_ln("simfp_5.1", dim, 1), **conv_ln("simfp_5.2", out, 3)}
    shapes.update({"backbone." + key: shape for key, shape in pyramid.items()})
    return shapes


def mmseg_mae_shapes(dim: int, depth: int, heads: int, patch: int, img_size: int) -> dict[str, tuple]:
    """Every parameter and buffer of mmsegmentation's MAE backbone (BEiT layers with bias=True, layer scale,
    relative position bias per layer over the img_size grid, final_norm=False), from mae.py and beit.py."""
    grid = img_size // patch
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, grid * grid + 1, dim),
              "patch_embed.projection.weight": (dim, 3, patch, patch), "patch_embed.projection.bias": (dim,)}
    for i in range(depth):
        layer = f"layers.{i}."
        shapes.update({
            layer + "gamma_1": (dim,), layer + "gamma_2": (dim,),
            layer + "ln1.weight": (dim,), layer + "ln1.bias": (dim,),
            layer + "attn.qkv.weight": (3 * dim, dim), layer + "attn.qkv.bias": (3 * dim,),
            layer + "attn.proj.weight": (dim, dim), layer + "attn.proj.bias": (dim,),
            layer + "attn.relative_position_bias_table": ((2 * grid - 1) ** 2 + 3, heads),
            layer + "attn.relative_position_index": (grid * grid + 1, grid * grid + 1),
            layer + "ln2.weight": (dim,), layer + "ln2.bias": (dim,),
            layer + "ffn.layers.0.0.weight": (4 * dim, dim), layer + "ffn.layers.0.0.bias": (4 * dim,),
            layer + "ffn.layers.1.weight": (dim, 4 * dim), layer + "ffn.layers.1.bias": (dim,)})
    return shapes


VITDET_LEFT_TO_TARGET = ("backbone.simfp_", ".attn.rel_pos_h", ".attn.rel_pos_w")
MMSEG_LEFT_TO_TARGET = (".attn.relative_position_bias_table", ".attn.relative_position_index")


def assert_fits_target(exported: dict[str, tuple], target: dict[str, tuple], left_to_target: tuple[str, ...]) -> None:
    """Every exported key is a target key of the same shape, and the target keys not exported are exactly those
    the target initialises itself."""
    unknown = sorted(set(exported) - set(target))
    assert not unknown, f"exported keys the target does not have: {unknown[:6]}"
    wrong = {k: (exported[k], target[k]) for k in exported if exported[k] != target[k]}
    assert not wrong, f"shapes differ from the target's (exported, target): {dict(list(wrong.items())[:6])}"
    not_given = {k for k in target if k not in exported}
    assert not_given == {k for k in target if any(part in k for part in left_to_target)}, \
        f"target keys left unset: {sorted(not_given - {k for k in target if any(p in k for p in left_to_target)})[:6]}"


@pytest.fixture(scope="module")
def official_vit_base() -> dict[str, torch.Tensor]:
    """An official mae_visualize_vit_base.pth in layout (encoder and decoder), values irrelevant here."""
    return {key: torch.zeros(shape) for key, shape in official_mae_vit_base_shapes().items()}


def convert_official(state: dict[str, torch.Tensor], target: str, input_size: int | None = None) -> dict[str, tuple]:
    encoder = export.infer_encoder(state, "", "official")
    converted, _ = export.convert(export.encoder_state(state, encoder, "official"), encoder, target, input_size)
    return {key: tuple(value.shape) for key, value in converted.items()}


def test_official_vit_base_fits_vitdet_coco_config(official_vit_base):
    """mask_rcnn_vitdet_b: img_size 1024, patch 16, window 14 except blocks 2, 5, 8, 11, pretrain_img_size 224."""
    target = vitdet_shapes(768, 12, 12, 16, img_size=1024, pretrain_img_size=224, window_size=14,
                           window_block_indexes=(0, 1, 3, 4, 6, 7, 9, 10))
    exported = convert_official(official_vit_base, "vitdet")
    assert exported["backbone.net.pos_embed"] == (1, 1 + 14 * 14, 768)
    assert_fits_target(exported, target, VITDET_LEFT_TO_TARGET)


def detectron2_matching(model: dict[str, tuple], checkpoint: dict[str, tuple]) -> dict[str, str]:
    """detectron2's matching heuristics (model key <- the longest checkpoint key it equals or ends with after a
    '.'; a shape mismatch is skipped; one checkpoint key for two model keys is an error): model key -> checkpoint key."""
    matched, used = {}, {}
    for model_key, shape in model.items():
        candidates = [c for c in checkpoint if model_key == c or model_key.endswith("." + c)]
        if not candidates:
            continue
        best = max(candidates, key=len)
        if checkpoint[best] != shape:
            continue
        if best in used:
            raise ValueError(f"checkpoint key {best} matches {used[best]} and {model_key}")
        matched[model_key], used[best] = best, model_key
    return matched


def test_vitdet_export_meets_detectron2_matching(official_vit_base):
    target = vitdet_shapes(768, 12, 12, 16, img_size=1024, pretrain_img_size=224, window_size=14,
                           window_block_indexes=(0, 1, 3, 4, 6, 7, 9, 10))
    exported = convert_official(official_vit_base, "vitdet")
    matched = detectron2_matching(target, exported)
    assert set(matched.values()) == set(exported)  # every exported tensor is loaded
    assert all(model_key == key for model_key, key in matched.items())  # by its full name, never by a suffix
    # the raw official file instead: the encoder loads by suffix too, but cls_token, norm and the decoder are unused
    raw = {k: tuple(v.shape) for k, v in official_vit_base.items()}
    unused = set(raw) - set(detectron2_matching(target, raw).values())
    assert {"cls_token", "norm.weight", "mask_token"} <= unused


def test_official_vit_base_fits_mmseg_ade20k_config(official_vit_base):
    """configs/mae: MAE(img_size=(512, 512), patch_size=16, embed_dims=768, num_layers=12, num_heads=12, init_values=1.0)."""
    target = mmseg_mae_shapes(768, 12, 12, 16, img_size=512)
    assert_fits_target(convert_official(official_vit_base, "mmseg", input_size=512), target, MMSEG_LEFT_TO_TARGET)
    # at the checkpoint's 224 only pos_embed differs, which mmsegmentation's resize_abs_pos_embed resizes at load
    at_224 = convert_official(official_vit_base, "mmseg")
    assert {k for k in at_224 if at_224[k] != target[k]} == {"pos_embed"}


def test_mmseg_layer_scale_is_one_and_values_follow_the_rules(checkpoints):
    state = model_state_from(load_checkpoint(checkpoints["official"]))
    encoder = export.infer_encoder(state, "", "official")
    converted, record = export.convert(export.encoder_state(state, encoder, "official"), encoder, "mmseg")
    assert all(torch.equal(converted[f"layers.{i}.gamma_{j}"], torch.ones(192)) for i in range(DEPTH) for j in (1, 2))
    assert torch.equal(converted["layers.1.ffn.layers.1.weight"], state["blocks.1.mlp.fc2.weight"])
    assert torch.equal(converted["layers.0.ln2.bias"], state["blocks.0.norm2.bias"])
    assert torch.equal(converted["patch_embed.projection.weight"], state["patch_embed.proj.weight"])
    assert record["mapping"]["norm.weight"] is None


def broken(rule: export.Rule) -> export.Rule:
    """The rule gone wrong: a renaming one writes another name, a dropping one keeps the key."""
    if rule.replacement is None:
        return export.Rule(rule.pattern, r"\g<0>", "broken")
    return export.Rule(rule.pattern, "broken." + rule.replacement, "broken")


VITDET_CHECK = ("vitdet", lambda state: convert_official(state, "vitdet"), vitdet_shapes(
    768, 12, 12, 16, img_size=1024, pretrain_img_size=224, window_size=14, window_block_indexes=(0, 1, 3, 4, 6, 7, 9, 10)),
    VITDET_LEFT_TO_TARGET)
MMSEG_CHECK = ("mmseg", lambda state: convert_official(state, "mmseg", 512), mmseg_mae_shapes(768, 12, 12, 16, 512),
               MMSEG_LEFT_TO_TARGET)


@pytest.mark.parametrize("check, index", [(VITDET_CHECK, i) for i in range(len(export.RULES["vitdet"]))]
                         + [(MMSEG_CHECK, i) for i in range(len(export.RULES["mmseg"]))],
                         ids=lambda value: value[0] if isinstance(value, tuple) else str(value))
def test_each_broken_rule_fails_the_target_check(official_vit_base, monkeypatch, check, index):
    target_name, convert_fn, target, left = check
    assert_fits_target(convert_fn(official_vit_base), target, left)  # the real rules pass
    rules = list(export.RULES[target_name])
    rules[index] = broken(rules[index])
    monkeypatch.setitem(export.RULES, target_name, tuple(rules))
    with pytest.raises(AssertionError, match="exported keys the target does not have"):
        assert_fits_target(convert_fn(official_vit_base), target, left)


def test_swapped_mlp_rules_fail_on_shapes(official_vit_base, monkeypatch):
    """A plausible slip, fc1 and fc2 exchanged: every name exists in mmsegmentation, the shapes give it away."""
    rules = {rule.replacement: rule for rule in export.RULES["mmseg"]}
    fc1, fc2 = rules[r"layers.\1.ffn.layers.0.0."], rules[r"layers.\1.ffn.layers.1."]
    swapped = tuple(export.Rule(fc1.pattern, fc2.replacement, "swapped") if r is fc1 else
                    export.Rule(fc2.pattern, fc1.replacement, "swapped") if r is fc2 else r for r in export.RULES["mmseg"])
    monkeypatch.setitem(export.RULES, "mmseg", swapped)
    with pytest.raises(AssertionError, match=r"shapes differ from the target's .*ffn\.layers\.0\.0\.weight.*\(768, 3072\), \(3072, 768\)"):
        assert_fits_target(convert_official(official_vit_base, "mmseg", 512), mmseg_mae_shapes(768, 12, 12, 16, 512),
                           MMSEG_LEFT_TO_TARGET)
