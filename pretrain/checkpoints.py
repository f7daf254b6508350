"""Build an MAE model from any checkpoint: ours (with metadata) or the official MAE release files."""
from __future__ import annotations

from typing import Any, Dict, Tuple

from engine.checkpoint import load_checkpoint

from .models_mae import MaskedAutoencoderViT

# heads by width for the official architectures (their files carry no config)
_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def infer_mae_kwargs(sd: Dict[str, Any]) -> Dict[str, Any]:
    """Architecture of an official-layout MAE state dict, from its parameter shapes."""
    if "decoder_pred.weight" not in sd:
        raise ValueError("this checkpoint has no decoder (an encoder-only export or a fine-tuned model); "
                         "reconstructions need a full MAE pretraining checkpoint")
    w = sd["patch_embed.proj.weight"]
    embed, patch = w.shape[0], w.shape[-1]
    dec = sd["decoder_embed.weight"].shape[0]
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    dec_depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks."))
    out = sd["decoder_pred.weight"].shape[0]
    target = "norm_pixel" if out == patch * patch * 3 else "hog"
    return dict(img_size=grid * patch, patch_size=patch, embed_dim=embed, depth=depth,
                num_heads=_HEADS.get(embed, max(1, embed // 64)), decoder_embed_dim=dec, decoder_depth=dec_depth,
                decoder_num_heads=16 if dec >= 512 else max(1, dec // 32), target=target)


def load_mae(path: str) -> Tuple[MaskedAutoencoderViT, Dict[str, Any]]:
    """Model and metadata from ``path`` (strict load: every key must match)."""
    ckpt = load_checkpoint(path)
    sd = ckpt.get("model", ckpt)
    meta = ckpt.get("meta", {}) if isinstance(ckpt.get("meta"), dict) else {}
    kwargs = meta.get("model_kwargs") or infer_mae_kwargs(sd)
    model = MaskedAutoencoderViT(**kwargs)
    model.load_state_dict(sd, strict=True)
    return model.eval(), {**meta, "model_kwargs": kwargs}
