"""MAE reconstruction grids: original | masked | reconstruction | reconstruction + visible patches."""
from __future__ import annotations

import os

import torch
from torchvision.utils import save_image

from engine.data import IMAGENET_MEAN, IMAGENET_STD

from .models_mae import MaskedAutoencoderViT


def _denorm(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruction_grid(model: MaskedAutoencoderViT, imgs: torch.Tensor, path: str, mask_ratio: float = 0.75,
                        seed: int = 0) -> str:
    """Save a grid for normalised images ``imgs`` [N, 3, H, W] (sides multiples of the patch size).
    Pixel targets show the reconstruction (de-normalised per patch for norm_pixel, as the MAE
    demo does); HOG targets have no pixel output, so their grid shows original and masked input."""
    was_training = model.training
    model.eval()
    try:
        grid = model.grid_for(imgs)
        L = grid[0] * grid[1]
        noise = torch.rand(imgs.shape[0], L, generator=torch.Generator().manual_seed(seed)).to(imgs.device)
        _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
        p = model.patch_size
        mask_img = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * 3), grid)   # 1 = removed
        masked = imgs * (1 - mask_img) + mask_img * 0.0  # removed patches drawn at the mean colour
        columns = [_denorm(imgs), _denorm(masked)]
        if model.target != "hog":
            if model.norm_pix_loss:
                target = model.patchify(imgs)
                mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
                pred = pred * (var + 1.0e-6) ** 0.5 + mean
            recon = model.unpatchify(pred.float(), grid)
            columns += [_denorm(recon), _denorm(imgs * (1 - mask_img) + recon * mask_img)]
        rows = torch.stack(columns, dim=1).flatten(0, 1)               # sample-major: one row per sample
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_image(rows.cpu(), path, nrow=len(columns), padding=2, pad_value=1.0)
        return path
    finally:
        model.train(was_training)
