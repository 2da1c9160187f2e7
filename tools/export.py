"""Export the encoder of a checkpoint to the frameworks people transfer it to: timm, safetensors, Hugging Face
(a timm folder), detectron2's ViTDet and mmsegmentation's MAE backbone.

    python tools/export.py runs/mae_b/checkpoint-799.pth --format timm --output exports/mae_b_timm.pth
    python tools/export.py runs/mae_b/checkpoint-799.pth --format hf --output exports/mae_b_hf
    python tools/export.py mae_pretrain_vit_base.pth --format vitdet --output exports/mae_b_vitdet.pth
    python tools/export.py runs/mi_mae_b/checkpoint-399.pth --format mmseg --input_size 512 --output exports/mi_mae_b_mmseg.pth

Sources: our pre-training checkpoints (every registered method: MAE, MI-MAE, U-MAE, M-MAE, CMAE; `model` and
`args` keys), our fine-tuning and probing checkpoints (models `vit_*`) and the official MAE files (`model` key,
MAE's names, no `args`: the size is read from the tensors). Only the encoder is kept: decoders, method heads
(MI-MAE's projector and V, CMAE's heads and `no_pos_embed`), classifier heads and optimizer state are dropped.

Formats (the source keys are MAE's, which are timm's; each rule below is written from the target's own code):
  - timm: a plain state dict (torch.save) for `timm.create_model(<architecture>, num_classes=0, **model_args)`;
  - safetensors: the same tensors in one .safetensors file, which loads without pickle;
  - hf: a folder with timm's `config.json` (architecture, model_args, pretrained_cfg) and `model.safetensors`;
    timm loads it offline with `timm.create_model("local-dir:<folder>", pretrained=True)`;
  - vitdet: `{"model": ...}` with detectron2's names (`backbone.net.` + MAE's), no cls token and no final norm;
    the relative position tables are left to detectron2, which starts them at zero;
  - mmseg: a plain state dict under mmsegmentation's `beit2mmseg` names, plus the layer scales `gamma_1`,
    `gamma_2` set to 1 (MAE has none: a scale of 1 is the same function); the relative position bias tables
    are left to mmsegmentation, whose MAE backbone starts them at zero.
`--input_size` resizes the position table (bicubic, the cls slot kept: all three targets keep it); for vitdet
it is the backbone's `pretrain_img_size`, for mmseg its `img_size`. Beside the output, `export.json` (hf: inside
the folder; otherwise `<output stem>.export.json`) records the source, its SHA-256, method, model, input size
and the key mapping used.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models_mae import MAE_SIZES  # noqa: E402
from util.checkpoint import load_checkpoint, model_state_from  # noqa: E402
from util.datasets import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from util.pos_embed import interpolate_pos_embed  # noqa: E402
from util.registry import method_for, pretrain_models  # noqa: E402

FORMATS = ("timm", "safetensors", "hf", "vitdet", "mmseg")
# timm's architecture per MAE_SIZES entry; the 32-px models are timm's tiny/small at patch 4 (model_args)
TIMM_ARCHITECTURES = {
    "vit_tiny_patch4": "vit_tiny_patch16_224", "vit_small_patch4": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224", "vit_large_patch16": "vit_large_patch16_224",
    "vit_huge_patch14": "vit_huge_patch14_224",
}
BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
              "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
_STEM_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
_ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.")


@dataclass(frozen=True)
class Encoder:
    """The geometry of a ViT encoder, read from a checkpoint's tensors (and its model name when it has one)."""

    size: str  # the MAE_SIZES entry: vit_base_patch16, vit_tiny_patch4, ...
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    global_pool: bool  # fine-tuned with global pooling: fc_norm on the mean of the patch tokens, no final norm


@dataclass(frozen=True)
class Source:
    path: Path
    sha256: str
    method: str
    model: str
    encoder: Encoder
    state: dict[str, torch.Tensor]  # the encoder only, MAE's (= timm's) names
    dropped: list[str]  # top-level names of what the source has beyond the encoder


@dataclass(frozen=True)
class Rule:
    """Rename the keys that `pattern` (a regex, anchored at the start) matches; replacement None drops them."""

    pattern: str
    replacement: Optional[str]
    why: str


# First matching rule wins; every encoder key must match one. Written from each target's model definition.
RULES: dict[str, tuple[Rule, ...]] = {
    "timm": (Rule(r"^", "", "timm's VisionTransformer uses MAE's names (its vit_*_224.mae weights are MAE's files)"),),
    "vitdet": (
        Rule(r"^cls_token$", None, "detectron2's ViT has no cls token; its pos_embed keeps the cls slot, which get_abs_pos drops"),
        Rule(r"^(fc_)?norm\.", None, "detectron2's ViT has no final norm: the feature pyramid reads the last block"),
        Rule(r"^(?=patch_embed\.proj\.|pos_embed$|blocks\.)", "backbone.net.",
             "the ViT sits at backbone.net inside SimpleFeaturePyramid; blocks, attn.qkv, mlp.fc1/fc2 and norm1/2 keep MAE's names"),
    ),
    "mmseg": (
        Rule(r"^(fc_)?norm\.", None, "configs/mae uses final_norm=False: no norm after the last layer"),
        Rule(r"^blocks\.(\d+)\.norm([12])\.", r"layers.\1.ln\2.", "beit2mmseg: blocks -> layers, norm -> ln inside blocks"),
        Rule(r"^blocks\.(\d+)\.mlp\.fc1\.", r"layers.\1.ffn.layers.0.0.", "beit2mmseg: mlp.fc1 -> ffn.layers.0.0"),
        Rule(r"^blocks\.(\d+)\.mlp\.fc2\.", r"layers.\1.ffn.layers.1.", "beit2mmseg: mlp.fc2 -> ffn.layers.1"),
        Rule(r"^blocks\.(\d+)\.attn\.", r"layers.\1.attn.", "beit2mmseg: blocks -> layers; MAE's layers keep qkv (with its bias) and proj"),
        Rule(r"^patch_embed\.proj\.", "patch_embed.projection.", "beit2mmseg: patch_embed.proj -> patch_embed.projection"),
        Rule(r"^(?=cls_token$|pos_embed$)", "", "beit2mmseg: the rest unchanged"),
    ),
}
RULES["safetensors"] = RULES["hf"] = RULES["timm"]
LEFT_TO_TARGET = {
    "timm": "nothing (num_classes=0: no head)",
    "safetensors": "nothing (timm's layout, num_classes=0: no head)",
    "hf": "nothing (num_classes=0: no head)",
    "vitdet": "attn.rel_pos_h / rel_pos_w of every block (detectron2 starts them at zero), the simple feature pyramid and the detection heads",
    "mmseg": "attn.relative_position_bias_table (zero in MAE's backbone) and relative_position_index, the neck and the decode heads",
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def infer_encoder(state: dict[str, torch.Tensor], model: str, source: str) -> Encoder:
    """The encoder's geometry: width, depth, patch and input size from the tensors; heads from the model's size."""
    for key in _STEM_KEYS:
        if key not in state:
            raise ValueError(f"{source}: no {key!r}: not a ViT/MAE checkpoint (encoder keys are {', '.join(_STEM_KEYS)}, blocks.*)")
    embed_dim = state["cls_token"].shape[-1]
    patch_size = state["patch_embed.proj.weight"].shape[-1]
    blocks = sorted({int(key.split(".")[1]) for key in state if key.startswith("blocks.")})
    if blocks != list(range(len(blocks))) or not blocks:
        raise ValueError(f"{source}: encoder blocks must be numbered 0..N-1, found {blocks[:8]}")
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if grid * grid != state["pos_embed"].shape[1] - 1:
        raise ValueError(f"{source}: pos_embed {tuple(state['pos_embed'].shape)} is not a cls slot plus a square grid")
    size = size_of(model, embed_dim, patch_size, source)
    return Encoder(size=size, embed_dim=embed_dim, depth=len(blocks), num_heads=MAE_SIZES[size]["num_heads"],
                   patch_size=patch_size, img_size=grid * patch_size,
                   global_pool="fc_norm.weight" in state and "norm.weight" not in state)


def size_of(model: str, embed_dim: int, patch_size: int, source: str) -> str:
    """The MAE_SIZES entry of `model` (e.g. mi_mae_vit_base_patch16 -> vit_base_patch16), or, for a file without
    a model name (the official releases), the one entry with this width and patch size."""
    if model:
        size = next((name for name in MAE_SIZES if model.endswith(name)), None)
        if size is None:
            raise ValueError(f"{source}: model {model!r} is none of the sizes {', '.join(MAE_SIZES)}")
        if (MAE_SIZES[size]["embed_dim"], MAE_SIZES[size]["patch_size"]) != (embed_dim, patch_size):
            raise ValueError(f"{source}: model {model!r} should have width {MAE_SIZES[size]['embed_dim']} and patch "
                             f"{MAE_SIZES[size]['patch_size']}, its tensors have {embed_dim} and {patch_size}")
        return size
    matches = [name for name, arch in MAE_SIZES.items() if (arch["embed_dim"], arch["patch_size"]) == (embed_dim, patch_size)]
    if len(matches) != 1:
        raise ValueError(f"{source}: no known ViT has width {embed_dim} and patch {patch_size}; known: "
                         + ", ".join(f"{n} ({a['embed_dim']}, {a['patch_size']})" for n, a in MAE_SIZES.items()))
    return matches[0]


def encoder_state(state: dict[str, torch.Tensor], encoder: Encoder, source: str) -> dict[str, torch.Tensor]:
    """The encoder's tensors under MAE's names, checked complete; an encoder key of unknown name is an error."""
    final_norm = "fc_norm" if encoder.global_pool else "norm"
    expected = [*_STEM_KEYS, *(f"blocks.{i}.{key}" for i in range(encoder.depth) for key in BLOCK_KEYS),
                f"{final_norm}.weight", f"{final_norm}.bias"]
    found = {key for key in state if key.startswith(_ENCODER_PREFIXES)}
    missing = [key for key in expected if key not in state]
    unknown = sorted(found - set(expected) - ({"norm.weight", "norm.bias"} if encoder.global_pool else set()))
    if missing:
        raise ValueError(f"{source}: the encoder lacks {missing[:5]} ({len(missing)} keys)")
    if unknown:
        raise ValueError(f"{source}: encoder keys this exporter does not know (not MAE's ViT): {unknown[:5]}")
    return {key: state[key].detach().to(torch.float32).contiguous() for key in expected}


def describe(checkpoint: dict[str, Any]) -> tuple[str, str]:
    """(method, model) of a checkpoint: from its saved args, or the official MAE release format without them."""
    args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    model = args.get("model", "")
    if model in pretrain_models():
        return method_for(model).name, model
    if model.startswith("vit_"):
        return f"fine-tuned or probed from {args.get('finetune') or 'random init'}", model
    if model:
        raise ValueError(f"model {model!r} is neither one of our pre-training models nor a vit_* downstream model")
    return "MAE (official release format)", ""


def read_source(path: str | Path) -> Source:
    path = Path(path)
    checkpoint = load_checkpoint(path)
    method, model = describe(checkpoint)
    state = model_state_from(checkpoint)
    encoder = infer_encoder(state, model, str(path))
    kept = encoder_state(state, encoder, str(path))
    dropped = sorted({key.split(".")[0] for key in state if key not in kept})
    return Source(path=path, sha256=sha256_of(path), method=method, model=model or f"{encoder.size} (from the tensors)",
                  encoder=encoder, state=kept, dropped=dropped)


def resize_position_table(state: dict[str, torch.Tensor], encoder: Encoder, input_size: Optional[int]) -> int:
    """Resize `pos_embed` in place to `input_size` (bicubic, cls slot kept); returns the size it is for."""
    if input_size is None or input_size == encoder.img_size:
        return encoder.img_size
    if input_size <= 0 or input_size % encoder.patch_size:
        raise ValueError(f"--input_size {input_size}: must be a positive multiple of the patch size {encoder.patch_size}")
    state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], (input_size // encoder.patch_size) ** 2)
    return input_size


def apply_rules(state: dict[str, torch.Tensor], target: str) -> tuple[dict[str, torch.Tensor], dict[str, Optional[str]]]:
    """(renamed tensors, source key -> target key or None where dropped) under RULES[target]."""
    renamed, mapping = {}, {}
    for key, value in state.items():
        rule = next((r for r in RULES[target] if re.match(r.pattern, key)), None)
        if rule is None:
            raise ValueError(f"--format {target}: no rule maps encoder key {key!r}")
        if rule.replacement is None:
            mapping[key] = None
            continue
        new_key = re.sub(rule.pattern, rule.replacement, key, count=1)
        if new_key in renamed:
            raise ValueError(f"--format {target}: keys {key!r} and another both map to {new_key!r}")
        renamed[new_key], mapping[key] = value, new_key
    return renamed, mapping


def added_tensors(target: str, encoder: Encoder) -> dict[str, torch.Tensor]:
    """Tensors the target has and MAE lacks, set so that the target computes MAE's function."""
    if target != "mmseg":
        return {}
    ones = torch.ones(encoder.embed_dim)
    return {f"layers.{i}.gamma_{j}": ones.clone() for i in range(encoder.depth) for j in (1, 2)}


def convert(state: dict[str, torch.Tensor], encoder: Encoder, target: str,
            input_size: Optional[int] = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The encoder `state` (MAE's names) in the target's names and layout, and the mapping record."""
    if target not in FORMATS:
        raise ValueError(f"--format {target!r}: choose one of {', '.join(FORMATS)}")
    state = dict(state)
    size = resize_position_table(state, encoder, input_size)
    renamed, mapping = apply_rules(state, target)
    added = added_tensors(target, encoder)
    renamed.update(added)
    record = {"input_size": size, "mapping": mapping, "added": {key: "ones" for key in added},
              "left_to_target": LEFT_TO_TARGET[target], "rules": [asdict(rule) for rule in RULES[target]]}
    return renamed, record


def timm_model_args(encoder: Encoder, input_size: int) -> dict[str, Any]:
    """The arguments that turn TIMM_ARCHITECTURES[size] into this encoder (they override the architecture's own)."""
    return {"img_size": input_size, "patch_size": encoder.patch_size, "depth": encoder.depth,
            "global_pool": "avg" if encoder.global_pool else "token"}


def timm_pretrained_cfg(input_size: int) -> dict[str, Any]:
    """timm's data config for these weights: our normalisation and evaluation resize (util.datasets)."""
    return {"input_size": [3, input_size, input_size], "fixed_input_size": True, "interpolation": "bicubic",
            "crop_pct": 0.875 if input_size >= 224 else 1.0, "crop_mode": "center", "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "num_classes": 0, "pool_size": None, "first_conv": "patch_embed.proj",
            "classifier": "head"}


def _replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """write(temporary name) beside `path`, then rename over it: an interrupted export leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the export from the group
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    _replace_atomically(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt", **metadata}))


def save_torch(obj: Any, path: Path) -> None:
    _replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def export(source_path: str | Path, target: str, output: str | Path, input_size: Optional[int] = None) -> dict[str, Any]:
    """Write the export and its export.json; returns the record."""
    source = read_source(source_path)
    state, conversion = convert(source.state, source.encoder, target, input_size)
    output = Path(output)
    size = conversion["input_size"]
    architecture = TIMM_ARCHITECTURES[source.encoder.size]
    record = {"source": str(source.path.resolve()), "source_sha256": source.sha256, "method": source.method,
              "model": source.model, "format": target, "encoder": asdict(source.encoder), **conversion,
              "dropped_from_source": source.dropped}
    if target in ("timm", "safetensors", "hf"):
        record["timm"] = {"architecture": architecture, "num_classes": 0, "model_args": timm_model_args(source.encoder, size)}
    metadata = {"source_sha256": source.sha256, "method": source.method, "model": source.model}
    if target == "hf":
        config = {"architecture": architecture, "num_classes": 0, "num_features": source.encoder.embed_dim,
                  "global_pool": timm_model_args(source.encoder, size)["global_pool"],
                  "model_args": timm_model_args(source.encoder, size), "pretrained_cfg": timm_pretrained_cfg(size)}
        output.mkdir(parents=True, exist_ok=True)
        save_safetensors(state, output / "model.safetensors", metadata)
        (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        record_path = output / "export.json"
    else:
        if target == "safetensors":
            save_safetensors(state, output, metadata)
        else:
            save_torch({"model": state} if target == "vitdet" else state, output)
        record_path = output.with_name(output.stem + ".export.json")
    record["output"] = str(output.resolve())
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def usage_hint(record: dict[str, Any]) -> str:
    """How to load the export in its target, one line."""
    output, size = record["output"], record["input_size"]
    if record["format"] == "hf":
        return f'timm.create_model("local-dir:{output}", pretrained=True)'
    if record["format"] in ("timm", "safetensors"):
        timm_args = record["timm"]
        args = ", ".join(f"{k}={v!r}" for k, v in timm_args["model_args"].items())
        return (f'timm.create_model("{timm_args["architecture"]}", num_classes=0, {args}, pretrained=True, '
                f'pretrained_cfg_overlay=dict(file="{output}", num_classes=0))')
    if record["format"] == "vitdet":
        return (f"detectron2: train.init_checkpoint = \"{output}\"; model.backbone.net: embed_dim="
                f"{record['encoder']['embed_dim']}, depth={record['encoder']['depth']}, num_heads={record['encoder']['num_heads']}, "
                f"patch_size={record['encoder']['patch_size']}, pretrain_img_size={size}")
    return (f"mmsegmentation configs/mae: model.pretrained = \"{output}\"; backbone MAE(img_size={size}, "
            f"patch_size={record['encoder']['patch_size']}, embed_dims={record['encoder']['embed_dim']}, "
            f"num_layers={record['encoder']['depth']}, num_heads={record['encoder']['num_heads']}, init_values=1.0)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Export a checkpoint's encoder to timm, safetensors, hf, ViTDet or mmsegmentation",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="our pre-training or fine-tuning checkpoint, or an official MAE .pth")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the target's key names and file layout")
    parser.add_argument("--output", required=True, help="the file to write (hf: the folder)")
    parser.add_argument("--input_size", default=None, type=int,
                        help="resize the position table to this image side (vitdet: pretrain_img_size; mmseg: img_size); "
                             "default: the checkpoint's own")
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    try:
        record = export(args.checkpoint, args.format, args.output, args.input_size)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err
    kept = sum(value is not None for value in record["mapping"].values())
    print(f"exported the encoder of {args.checkpoint} ({record['method']}, {record['model']}) to {args.format}: "
          f"{kept} tensors + {len(record['added'])} added, input size {record['input_size']} -> {record['output']}\n"
          f"load it with: {usage_hint(record)}")
    return record


if __name__ == "__main__":
    main()
