"""``python tests/_record_masks.py OUT.pt [python -m pretrain arguments]``: a pretraining run that
records the MAE masks of its training forward passes (``ids_keep`` per call, in call order) into
OUT.pt; started once per rank with torchrun's environment variables (tests/test_distributed_state.py)."""
import atexit
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pretrain.main import main  # noqa: E402
from pretrain.models_mae import MaskedAutoencoderViT  # noqa: E402

masks = []
encode = MaskedAutoencoderViT.forward_encoder


def recording(self, imgs, mask_ratio, noise=None):
    out = encode(self, imgs, mask_ratio, noise)
    if self.training and imgs.device.type != "meta":   # training steps (not pictures, evaluations, FLOP counts)
        masks.append(out[1].detach().clone())
    return out


MaskedAutoencoderViT.forward_encoder = recording
atexit.register(lambda: torch.save(masks, sys.argv[1]))
sys.exit(main(sys.argv[2:]))
