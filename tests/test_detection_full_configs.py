"""The full detection configs (configs/detection/*_1x_coco.py, *_100ep_coco.py and the custom-data
config) through a real training step on the CPU, by the documented smoke-run switches of
tools/det_train.py: mixed precision follows the device (fp32 here, with a notice),
``pretrained=None`` (random init), ``image_size=128`` (every resize / crop / padded square and the
ViT's tables at a 128-px square; LSJ and the iteration-based loop included). Also: ViTDet's Cascade
RoI head (one mask head, detectron2's inputs), the AMP switch and the image-size re-application
for mmdet's own tools (DetRunner)."""
import copy
import gc
import itertools
import json
import math
import os
from pathlib import Path

import pytest

pytest.importorskip("mmdet")
pytestmark = pytest.mark.det

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402

from engine.config import ConfigError  # noqa: E402
from test_detection import _load_tool, single_thread  # noqa: E402,F401  (single_thread: an autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "detection"
FULL_CONFIGS = sorted(p.stem for p in [*CONFIGS.glob("*_1x_coco.py"), *CONFIGS.glob("*_100ep_coco.py")])
CUSTOM_CONFIG = "cascade-mask-rcnn_vit-mae_sfp_custom_coco"
_RUN_IDS = itertools.count()


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    """Two 96x128 train (and val) images in COCO's layout with COCO category names (so the full
    configs' 80-class metainfo keeps them): filled rectangles with polygon masks."""
    root = tmp_path_factory.mktemp("tiny_coco")
    from PIL import Image
    rng = np.random.RandomState(0)
    cats = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 3, "name": "car", "supercategory": "vehicle"}]
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(2):
            h, w = 96, 128
            img = rng.randint(0, 60, size=(h, w, 3)).astype(np.uint8)
            for k, (x0, y0, x1, y1) in enumerate([(8, 10, 60, 80), (70, 20, 120, 60)]):
                img[y0:y1, x0:x1] = 200 if k == 0 else 120
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cats[k]["id"], "iscrowd": 0,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0)),
                             "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
            name = f"{i + 1:012d}.jpg"
            Image.fromarray(img).save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        (root / "annotations").mkdir(exist_ok=True)
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return str(root) + "/"


def smoke_options(data_root, iter_based, extra=()):
    """The documented CPU smoke run (tools/det_train.py's docstring, docs/detection.md), one
    iteration of one image, no validation, no checkpoint; for time, the test also caps the RPN's
    proposals at 32 (fewer RoIs through the 4conv1fc heads) and uses torch's fused AdamW (the same
    update, one kernel: about 2.5 s less per ViT-L step on a CPU)."""
    opts = [f"data_root={data_root}", "pretrained=None", "image_size=128",
            "train_dataloader.batch_size=1", "train_dataloader.num_workers=0",
            "train_dataloader.persistent_workers=False",
            "val_cfg=None", "val_dataloader=None", "val_evaluator=None", "default_hooks.checkpoint=None",
            "default_hooks.logger.interval=1", "log_level=WARNING", f"visualizer.name=fullcfg{next(_RUN_IDS)}",
            "optim_wrapper.optimizer.fused=True", "randomness.seed=0"]
    opts += ["train_cfg.max_iters=1"] if iter_based else ["train_cfg.max_epochs=1", "train_dataloader.dataset.indices=1"]
    return opts + list(extra)


def _train_once(config, data_root, tmp_path, extra=()):
    from detection.user_settings import parse_config_file
    train = _load_tool("det_train")
    cfg = parse_config_file(str(CONFIGS / f"{config}.py"))     # (parsed once: det_train.py reads the same copy)
    iter_based = cfg.train_cfg.type == "IterBasedTrainLoop"
    rpn = ["model.train_cfg.rpn_proposal.max_per_img=32"] if "rpn_proposal" in (cfg.model.get("train_cfg") or {}) else []
    out = train.run(train.parse_args([str(CONFIGS / f"{config}.py"), "--work-dir", str(tmp_path / "wd"),
                                      "--cfg-options", *smoke_options(data_root, iter_based, [*rpn, *extra])]))
    runner = out["runner"]
    scalars = runner.message_hub.log_scalars
    losses = {k[len("train/"):]: float(v.current()) for k, v in scalars.items()
              if k.startswith("train/") and "loss" in k}
    info = dict(iter=runner.iter, losses=losses, wrapper=type(runner.optim_wrapper).__name__,
                model=runner.model, cfg=runner.cfg)
    del out, runner
    return info


@pytest.mark.parametrize("config", FULL_CONFIGS)
def test_every_full_config_trains_a_step_on_cpu(config, tiny_coco, tmp_path, capsys):
    """pytest -k "full_config and train": each full config (LSJ, iteration-based loop, layer decay,
    AMP wrapper, SyncBN Swin heads included) trains one iteration on the CPU at a 128-px square
    from random weights; every loss is finite."""
    info = _train_once(config, tiny_coco, tmp_path)
    try:
        assert info["iter"] == 1
        assert info["losses"] and all(math.isfinite(v) for v in info["losses"].values()), info["losses"]
        assert "loss" in info["losses"]
        if not torch.cuda.is_available():           # AMP follows the device: fp32 on this CPU, and says so
            assert info["wrapper"] == "OptimWrapper"
            assert capsys.readouterr().out.count("AMP: no CUDA device, so this run trains in fp32") == 1
        cfg = info["cfg"]
        assert cfg.pretrained is None and cfg.model.backbone.init_cfg is None
        if cfg.model.backbone.type == "PlainViT":
            assert cfg.model.backbone.img_size == cfg.model.data_preprocessor.square_size == 128
        if "cascade" in config:
            masks = sorted(k for k in info["losses"] if "loss_mask" in k)
            one_head = cfg.model.roi_head.type == "ViTDetCascadeRoIHead"
            assert masks == (["s0.loss_mask"] if one_head else ["s0.loss_mask", "s1.loss_mask", "s2.loss_mask"])
            assert one_head == config.endswith("_vitdet_100ep_coco")
    finally:
        info.clear()
        gc.collect()


def test_full_config_trains_with_mmdets_own_train_script_on_cpu(tiny_coco, tmp_path):
    """The same smoke run through mmdet's tools/train.py: `amp`, `pretrained=None` and `image_size`
    reach the model through the configs' DetRunner (mmdet merges --cfg-options literally), and the
    AMP notice is logged."""
    import subprocess
    import sys

    import mmdet
    script = Path(mmdet.__file__).parent / ".mim" / "tools" / "train.py"
    config = CONFIGS / "retinanet_vit-b-mae_vitdet_100ep_coco.py"
    r = subprocess.run([sys.executable, str(script), str(config), "--work-dir", str(tmp_path / "wd"), "--cfg-options",
                        *smoke_options(tiny_coco, iter_based=True, extra=["log_level=INFO"])],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "AMP: no CUDA device, so this run trains in fp32 with OptimWrapper" in out
    assert "re-applied to: model.data_preprocessor.square_size, model.backbone.img_size" in out
    assert "pretrained=None: the backbone starts from random weights" in out
    losses = [json.loads(line) for line in (tmp_path / "wd").glob("*/vis_data/scalars.json").__next__().open()]
    assert losses and all(math.isfinite(v) for row in losses for k, v in row.items() if "loss" in k)


def test_custom_config_trains_with_an_encoder_of_another_size_and_classes_from_the_file(tiny_coco, tmp_path):
    """The custom-data config takes its encoder geometry from `pretrained` (a ViT-Tiny, patch 8,
    6 blocks, pretrained at 64 px: none of ViT-B's numbers) and its classes from the annotation
    file; one step on the CPU, finite losses."""
    from pretrain.main import export_encoder
    from pretrain.models_mae import create_mae
    torch.manual_seed(0)
    m = create_mae("mae_vit_tiny_patch16", img_size=64, patch_size=8, depth=6, decoder_depth=1)
    meta = {"kind": "mae_pretrain", "model_kwargs": {"patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3,
                                                     "img_size": 64}}
    enc = export_encoder({"model": m.state_dict(), "meta": meta}, str(tmp_path / "encoder.pth"))
    info = _train_once(CUSTOM_CONFIG, tiny_coco, tmp_path, extra=[f"pretrained={enc}"])
    try:
        cfg = info["cfg"]
        b = cfg.model.backbone
        assert (b.patch_size, b.embed_dim, b.depth, b.num_heads, b.pretrain_img_size) == (8, 192, 6, 3, 64)
        assert tuple(b.global_attn_indexes) == (0, 2, 3, 5) and b.init_cfg.checkpoint == enc
        assert (cfg.model.neck.in_channels, cfg.model.neck.backbone_stride) == (192, 8)
        assert cfg.classes == ("person", "car")
        assert cfg.train_dataloader.dataset.metainfo.classes == ("person", "car")
        assert [h.num_classes for h in cfg.model.roi_head.bbox_head] == [2, 2, 2]
        assert cfg.model.roi_head.mask_head.num_classes == 2
        assert info["iter"] == 1 and all(math.isfinite(v) for v in info["losses"].values())
    finally:
        info.clear()
        gc.collect()
    # without a checkpoint the geometry has no source: one message naming the keys
    from detection.custom import resolve_derived
    cfg = Config.fromfile(str(CONFIGS / f"{CUSTOM_CONFIG}.py"))
    cfg.model.backbone.init_cfg = None
    with pytest.raises(ConfigError, match="model.backbone leaves patch_size, embed_dim, depth, num_heads, "
                                          "pretrain_img_size to the pretrained encoder"):
        resolve_derived(cfg)


# ---- switches -----------------------------------------------------------------------------------
def test_amp_follows_the_device_and_the_switches():
    from detection.amp import resolve_amp
    base = Config.fromfile(str(CONFIGS / "cascade-mask-rcnn_vit-b-mae_sfp_1x_coco.py"))
    cfg = copy.deepcopy(base)
    assert resolve_amp(cfg, cuda=True) is None and cfg.optim_wrapper.type == "AmpOptimWrapper"
    cfg = copy.deepcopy(base)
    notice = resolve_amp(cfg, cuda=False)
    assert notice.startswith("AMP: no CUDA device, so this run trains in fp32 with OptimWrapper")
    assert cfg.optim_wrapper.type == "OptimWrapper" and "loss_scale" not in cfg.optim_wrapper
    assert cfg.optim_wrapper.constructor == "ViTLayerDecayOptimizerConstructor"       # the rest stays
    assert resolve_amp(cfg, cuda=False) is None                                       # once
    cfg = copy.deepcopy(base)
    cfg.amp = False
    assert "amp=False" in resolve_amp(cfg, cuda=True) and cfg.optim_wrapper.type == "OptimWrapper"
    cfg = copy.deepcopy(base)
    cfg.amp = True
    with pytest.raises(ConfigError, match=r"amp=True \(--amp\) needs a CUDA device"):
        resolve_amp(cfg, cuda=False)
    cfg = copy.deepcopy(base)                    # the workaround now works alone
    cfg.optim_wrapper.type = "OptimWrapper"
    assert "dropped loss_scale" in resolve_amp(cfg, cuda=False) and "loss_scale" not in cfg.optim_wrapper
    demo = Config.fromfile(str(CONFIGS / "retinanet_vit-tiny-mae_sfp_demo.py"))   # fp32 stays fp32
    assert resolve_amp(demo, cuda=True) is None and demo.optim_wrapper.type == "OptimWrapper"
    demo.amp = True
    resolve_amp(demo, cuda=True)
    assert demo.optim_wrapper.type == "AmpOptimWrapper" and demo.optim_wrapper.loss_scale == "dynamic"
    cfg = copy.deepcopy(base)
    cfg.amp = "sometimes"
    with pytest.raises(ConfigError, match="amp='sometimes' is not a choice"):
        resolve_amp(cfg)
    train = _load_tool("det_train")
    assert train.parse_args(["c.py", "--no-amp"]).amp is False and train.parse_args(["c.py", "--amp"]).amp is True
    assert train.parse_args(["c.py"]).amp is None
    with pytest.raises(SystemExit):
        train.parse_args(["c.py", "--amp", "--no-amp"])


def test_image_size_and_random_init_follow_under_mmdets_own_tools(tmp_path):
    """What DetRunner.from_cfg does for mmdet's tools/train.py (which merges --cfg-options
    literally): image_size re-applied to every input size (the LSJ scale and crop too), and
    pretrained=None removing the backbone's init_cfg instead of a ConfigError."""
    from detection.user_settings import rebind_from_file
    cfg = Config.fromfile(str(CONFIGS / "cascade-mask-rcnn_vit-b-mae_vitdet_100ep_coco.py"))
    cfg.merge_from_dict({"image_size": 128, "pretrained": None})
    changed = rebind_from_file(cfg)
    assert cfg.model.backbone.init_cfg is None and "model.backbone.init_cfg" in changed
    assert cfg.model.backbone.img_size == cfg.model.data_preprocessor.square_size == 128
    ops = {t.type: t for t in cfg.train_dataloader.dataset.pipeline}
    assert ops["RandomResize"].scale == (128, 128) and ops["RandomResize"].ratio_range == (0.1, 2.0)
    assert ops["RandomCrop"].crop_size == (128, 128)
    assert {t.type: t for t in cfg.test_dataloader.dataset.pipeline}["Resize"].scale == (128, 128)
    assert rebind_from_file(cfg) == []
    swin = Config.fromfile(str(CONFIGS / "cascade-mask-rcnn_swin-t_1x_coco.py"))   # no image_size of its own
    swin.merge_from_dict({"image_size": 128})
    rebind_from_file(swin)
    choice = [t for t in swin.train_dataloader.dataset.pipeline if t.type == "RandomChoice"][0]
    assert choice.transforms[0][0].scales == [(128, 128)] and choice.transforms[1][1].crop_size == (128, 128)
    with pytest.raises(ConfigError, match="image_size must be a whole number of pixels >= 16"):
        from detection.user_settings import apply_image_size
        apply_image_size(swin, "big")


# ---- ViTDet's Cascade RoI head --------------------------------------------------------------------
def _samples(n_img=1, size=128):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    out = []
    for i in range(n_img):
        s = DetDataSample(metainfo=dict(img_shape=(96, size), pad_shape=(size, size), ori_shape=(96, size),
                                        batch_input_shape=(size, size), scale_factor=(1.0, 1.0)))
        boxes = torch.tensor([[8., 10., 60., 80.], [70., 20., 120., 60.]])
        masks = np.zeros((2, 96, size), np.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        s.gt_instances = InstanceData(bboxes=boxes, labels=torch.tensor([0, 2]), masks=BitmapMasks(masks, 96, size))
        s.ignored_instances = InstanceData(bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
        out.append(s)
    return out


def _proposals(n_img=1, n=48, seed=0):
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(seed)
    res = []
    for _ in range(n_img):
        xy = torch.rand(n, 2, generator=g) * 90
        wh = 12 + torch.rand(n, 2, generator=g) * 50
        res.append(InstanceData(bboxes=torch.cat([xy, (xy + wh).clamp(max=127)], 1), scores=torch.rand(n, generator=g)))
    return res


@pytest.fixture(scope="module")
def vitdet_cascade():
    """The ViT-B Cascade Mask R-CNN 100ep model built through mmdet's registry (at 128 px, random
    init), and the 1x config's for comparison."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    import detection  # noqa: F401  (registers the plug-in)
    from detection.user_settings import apply_image_size
    init_default_scope("mmdet")
    models = {}
    for recipe in ("vitdet_100ep", "sfp_1x"):
        cfg = Config.fromfile(str(CONFIGS / f"cascade-mask-rcnn_vit-b-mae_{recipe}_coco.py"))
        apply_image_size(cfg, 128)
        cfg.model.backbone.init_cfg = None
        torch.manual_seed(0)
        models[recipe] = MODELS.build(cfg.model)
    return models


def test_vitdet_cascade_builds_one_mask_head(vitdet_cascade):
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead

    from detection import ViTDetCascadeRoIHead
    model = vitdet_cascade["vitdet_100ep"]
    head = model.roi_head
    assert type(head) is ViTDetCascadeRoIHead and head.num_stages == 3 and len(head.bbox_head) == 3
    assert sum(isinstance(m, FCNMaskHead) for m in model.modules()) == 1
    assert isinstance(head.mask_head, FCNMaskHead) and len(head.mask_head.convs) == 4
    assert any(n.startswith("roi_head.mask_head.convs.0.") for n, _ in model.named_parameters())
    assert list(head.stage_loss_weights) == [1, 1, 1] and head.scale_box_feature_grad
    # the papers' 1x protocol keeps mmdet's three heads
    assert sum(isinstance(m, FCNMaskHead) for m in vitdet_cascade["sfp_1x"].modules()) == 3
    with pytest.raises(ValueError, match="ViTDetCascadeRoIHead has one mask_head"):
        from mmdet.registry import MODELS
        cfg = Config.fromfile(str(CONFIGS / "cascade-mask-rcnn_vit-b-mae_vitdet_100ep_coco.py")).model.roi_head
        cfg.mask_head = [cfg.mask_head] * 3
        MODELS.build(cfg)


def test_vitdet_cascade_mask_head_sees_stage_one_positives_and_the_final_boxes(vitdet_cascade):
    """detectron2's CascadeROIHeads: in training the mask head gets the positive RoIs sampled for
    stage 1 (RPN proposals + ground truth, IoU >= 0.5), once, with loss weight 1; at test time it
    runs once on the final boxes. Also through the whole detector's loss."""
    from mmdet.structures.bbox import bbox2roi
    model = vitdet_cascade["vitdet_100ep"]
    head = model.roi_head
    head.train()
    seen, sampled = [], {0: [], 1: [], 2: []}
    real_extract = head.mask_roi_extractor.forward

    def extract(feats, rois, *a, **k):
        seen.append(rois.detach().clone())
        return real_extract(feats, rois, *a, **k)

    samplers = []
    for stage, sampler in enumerate(head.bbox_sampler):
        def sample(*a, _real=sampler.sample, _stage=stage, **k):
            res = _real(*a, **k)
            sampled[_stage].append(res)
            return res
        samplers.append((sampler, sampler.sample))
        sampler.sample = sample
    head.mask_roi_extractor.forward = extract
    try:
        torch.manual_seed(0)
        x = tuple(torch.randn(1, 256, 128 // s, 128 // s) for s in (4, 8, 16, 32, 64))
        losses = head.loss(x, _proposals(), _samples())
        assert sorted(k for k in losses if "mask" in k) == ["s0.loss_mask"]
        assert len(seen) == 1
        stage0 = bbox2roi([r.pos_priors for r in sampled[0]])
        torch.testing.assert_close(seen[0], stage0)
        assert len(sampled[1]) == 1 and not torch.equal(bbox2roi([r.pos_priors for r in sampled[1]]), stage0)
        assert torch.isfinite(losses["s0.loss_mask"])

        # detectron2's box-loss weighting: weights 1, 1, 1 and the features' gradient scaled by 1/3
        def grad_of(stage_key, scale):
            head.scale_box_feature_grad = scale
            xs = tuple(t.clone().requires_grad_() for t in x)
            torch.manual_seed(1)
            out = head.loss(xs, _proposals(seed=1), _samples())
            out[stage_key].backward()
            return torch.cat([t.grad.flatten() for t in xs if t.grad is not None])
        for key in ("s0.loss_cls", "s2.loss_cls"):
            torch.testing.assert_close(grad_of(key, True), grad_of(key, False) / 3, rtol=1e-4, atol=1e-8)
        head.scale_box_feature_grad = True

        # test time: one mask-head pass, on the final (last stage, NMS'd) boxes
        head.eval()
        head.test_cfg.score_thr = 0.0
        seen.clear()
        with torch.no_grad():
            results = head.predict(x, _proposals(seed=2), _samples(), rescale=False)
        assert len(seen) == 1 and len(results[0]) > 0
        torch.testing.assert_close(seen[0], bbox2roi([r.bboxes for r in results]))
        assert results[0].masks.shape[0] == len(results[0])

        # the whole detector (ViT-B + pyramid + RPN) through its data preprocessor
        model.train()
        seen.clear()
        data = model.data_preprocessor(dict(inputs=[torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)],
                                            data_samples=_samples()), training=True)
        losses = model.loss(data["inputs"], data["data_samples"])
        assert data["inputs"].shape[-2:] == (128, 128) and len(seen) == 1
        assert sorted(k for k in losses if "mask" in k) == ["s0.loss_mask"]
    finally:
        head.mask_roi_extractor.forward = real_extract
        for sampler, real in samplers:
            sampler.sample = real


def test_bad_data_root_is_one_message_and_exit_2(tiny_coco, tmp_path, capsys):
    """A data_root that does not hold the set the config reads: one line naming it, exit code 2,
    before the runner (and its config dump) exists, for det_train.py and det_test.py alike: no
    annotation file, or an annotation file whose images are not in the image folder."""
    import shutil
    train, test = _load_tool("det_train"), _load_tool("det_test")
    config = str(CONFIGS / "cascade-mask-rcnn_vit-b-mae_vitdet_100ep_coco.py")
    wd = tmp_path / "wd"
    mixed = tmp_path / "mixed"                       # annotations of the set, but no images in the folders
    shutil.copytree(Path(tiny_coco) / "annotations", mixed / "annotations")
    (mixed / "train2017").mkdir()
    (mixed / "val2017").mkdir()
    for root in (f"{tmp_path}/nowhere/", f"{mixed}/"):
        for tool, args, loader, split in ((train, [config], "train_dataloader", "train2017"),
                                          (test, [config, str(tmp_path / "no.pth")], "test_dataloader", "val2017")):
            assert tool.main([*args, "--work-dir", str(wd), "--cfg-options", f"data_root={root}"]) == 2
            err = capsys.readouterr().err
            ann = f"{root}annotations/instances_{split}.json"
            expected = (f"{loader}.dataset.ann_file '{ann}' does not exist" if "nowhere" in root else
                        f"{loader}: the first image of '{ann}', '000000000001.jpg', is not in '{root}{split}/'")
            assert err.startswith("error: ") and expected in err, err
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not wd.exists()
