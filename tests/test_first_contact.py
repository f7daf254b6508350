"""What a new user meets first, through the real command lines (``python -m pretrain`` /
``python -m finetune``'s ``main``): user errors end with exit code 2 and a message naming the key
or file, resume refuses changed settings and keeps the run's record, checks run before the data
scan, --print-config / --dry-run, and the pretrain -> fine-tune hand-over."""
import json
import os
from pathlib import Path

import pytest
import timm
import torch
import yaml

import finetune.main as finetune_main
import pretrain.main as pretrain_main
from engine.checkpoint import load_checkpoint
from engine.config import load_config
from engine.demo_data import generate_demo_dataset
from engine.trainer import truncate_metrics
from finetune.config import ClassifierConfig
from finetune.models import resolve_architecture
from finetune.task import evaluate
from pretrain.config import PretrainConfig


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A 4-class set with train/ and val/ (48 images of 40 px)."""
    path = tmp_path_factory.mktemp("data") / "set"   # the generator makes its own folder
    generate_demo_dataset(str(path), num_images=48, size=40, val_fraction=0.25)
    return path


def tiny(data, out, *extra):
    return [f"data.path={data}", "data.num_workers=0", "data.replay_chunks=2", "model.arch=mae_vit_tiny_patch16",
            "model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
            "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2",
            "curriculum.name=etpp", "curriculum.epochs=1.5", "train.batch_size=8", "train.warmup_epochs=0.2",
            "train.log_every=1", "train.progress=false", "train.device=cpu", f"train.output_dir={out}", *extra]


def pretrain(*argv):
    return pretrain_main.main([str(a) for a in argv])


def err_of(capsys):
    """stderr of an in-process main() that returned (an unexpected exception would have propagated
    and failed the test instead)."""
    return capsys.readouterr().err


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def no_scan(monkeypatch):
    """Fail the test if the data folder is scanned (checks must come first)."""
    def scan(*a, **k):
        raise AssertionError("the data folder was scanned before the check")
    monkeypatch.setattr(pretrain_main, "open_image_source", scan)


def test_pretrain_user_errors_exit_2_with_the_key_or_file(root, tmp_path, capsys, no_scan):
    data = root / "train"
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    encoder_only = tmp_path / "timm.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).state_dict(),
               encoder_only)
    cases = [
        (["model.img_size=100", "model.patch_size=8"],
         "model.img_size=100 is not a multiple of the patch size 8 (model.patch_size or the arch's); allowed: "
         "multiples of 8, e.g. 96 or 104"),
        (["model.embed_dim=33"], "model: embed_dim 33 is not divisible by num_heads 2"),
        ([f"train.resume={junk}"], f"train.resume '{junk}' is not a PyTorch checkpoint: it is binary data starting "
                                   f"with bytes"),
        ([f"train.resume={tmp_path}/missing.pth"], f"train.resume '{tmp_path}/missing.pth' does not exist"),
        ([f"train.resume={encoder_only}"], "is not a training checkpoint of this toolkit"),
        (["curriculum.name=etp"], "unknown curriculum 'etp'"),
        (["curriculum.multiple_of=4"], "that are not multiples of the patch size 8"),
        (["train.batchsize=8"], "unknown key(s) train.batchsize (did you mean train.batch_size?)"),
        (["--output_dir", "somewhere"], "--output_dir is not an option here: settings are config keys given as "
                                        "key=value; use train.output_dir=somewhere"),
        (["--batch_size=64"], "use train.per_gpu_batch_size=64"),
        (["--norm_pix_loss"], "use model.target=norm_pixel"),
        (["--bogus"], "unknown option --bogus; options: --config, --print-config, --dry-run"),
        (["--print"], "unknown option --print;"),                                   # no abbreviations
        (["configs/pretrain/demo.yaml"], "give a config file as --config configs/pretrain/demo.yaml"),
        (["train.log_every=0"], "train.log_every must be >= 1, got 0"),
        (["train.clip_grad=-1"], "train.clip_grad must be > 0 (or null), got -1.0"),
        (["train.warmup_epochs=2"], "train.warmup_epochs=2 is not below curriculum.epochs=1.5"),
        (["curriculum.epochs=0"], "curriculum.epochs must be > 0 (the budget), got 0.0"),
        (["train.resume_allow=[train.bllr]"], "train.resume_allow names ['train.bllr'], which are no key or section "
                                              "of this config (did you mean train.blr?)"),
        (["data.demo=true"], f"data.path '{data}' exists and is not a generated demo set (it holds 4 entries: "
                             "'cross', 'disc', 'square', ...; a generated one holds a .efficienttrain-generated "
                             "file), but data.demo=true would generate one there; set data.demo=false"),
    ]
    for extra, message in cases:
        assert pretrain(*tiny(data, tmp_path / "run", *extra)) == 2, extra
        err = err_of(capsys)
        assert message in err, (extra, err)
        assert "weights_only=False" not in err
    assert pretrain() == 2
    assert "data.path is required" in err_of(capsys)


def test_every_stage_is_checked_before_the_data_scan_or_any_step(root, tmp_path, capsys, no_scan):
    cur = tmp_path / "late_replay.yaml"      # stage 0 plain, stage 1 replays: its chunks do not divide
    cur.write_text("name: late\nbudget: compute\nstages:\n  - {size: 16, share: 0.5}\n"
                   "  - {size: 32, share: 0.5, replay_times: 2, replay_buffer: 2}\n")
    out = tmp_path / "run"
    assert pretrain(*tiny(root / "train", out, f"curriculum.name={cur}", "data.replay_chunks=3")) == 2
    err = err_of(capsys)
    assert "curriculum stage 1 (size 32, replay 2): the per-process loader micro-batch 4" in err
    assert "not divisible by data.replay_chunks=3" in err
    assert not (out / "checkpoints").exists() and not (out / "config.yaml").exists()
    assert "error: curriculum stage 1" in (out / "log.txt").read_text()     # the failure is in the run's log too
    assert pretrain(*tiny(root / "train", out, "train.batch_size=9", "train.accum_steps=2", "train.resume=never")) == 2
    # (the 16 px stages hold the batch in one micro-step, train.accum_by_stage: the first 24 px stage fails)
    assert "curriculum 'etpp', stage 2: batch size 9 is not divisible by accum_steps 2" in err_of(capsys)


def test_resume_refuses_changed_settings_and_keeps_the_record(root, tmp_path, capsys):
    data, out = root / "train", tmp_path / "run"
    assert pretrain(*tiny(data, out, "train.max_steps=3")) == 0
    first = capsys.readouterr().out
    assert "encoder of step 3/" in first and "(a partial run: train.max_steps)" in first
    assert load_checkpoint(str(out / "encoder.pth"))["meta"]["position"]["step"] == 3
    record = (out / "config.yaml").read_bytes()
    for extra, lines in ((["model.depth=2"], ["model.depth: 1 in the run, 2 now"]),
                         (["train.blr=0.01"], ["train.blr: 0.00015 in the run, 0.01 now"]),
                         (["model.mask_ratio=0.5", "model.target=pixel"],
                          ["model.mask_ratio: 0.75 in the run, 0.5 now", "model.target: 'norm_pixel' in the run, 'pixel' now"])):
        assert pretrain(*tiny(data, out, "train.max_steps=5", *extra)) == 2
        err = err_of(capsys)
        assert f"cannot resume from {out}/checkpoints/checkpoint-latest.pth: {len(lines)} setting(s) differ" in err
        assert all(line in err for line in lines), err
        assert ("model.depth cannot change within a run" in err) if extra == ["model.depth=2"] else \
            ("train.resume_allow=[" in err)
        assert (out / "config.yaml").read_bytes() == record            # the run's record is untouched
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    # the same refusal without training anything: --dry-run
    assert pretrain(*tiny(data, out, "train.blr=0.01", "--dry-run")) == 2
    assert "train.blr: 0.00015 in the run, 0.01 now" in err_of(capsys)
    # the architecture cannot be accepted; starting over in the same folder is refused too
    assert pretrain(*tiny(data, out, "model.depth=2", "train.resume_allow=['*']")) == 2
    assert "not possible for model.depth" not in (err := err_of(capsys)) and "model.depth cannot change" in err
    assert pretrain(*tiny(data, out, "train.resume=never")) == 2
    assert f"train.resume=never, but {out} holds the checkpoints of a run" in err_of(capsys)

    # accepted explicitly: it continues, and the new settings are written beside the original
    assert pretrain(*tiny(data, out, "train.max_steps=5", "train.log_every=2", "train.blr=0.01",
                          "train.resume_allow=[train.blr]")) == 0
    assert "settings changed, accepted by train.resume_allow: train.blr: 0.00015 -> 0.01" in capsys.readouterr().out
    assert (out / "config.yaml").read_bytes() == record
    resumed = (out / "config.resume-1.yaml").read_text()
    assert f"# resumed from: {out}/checkpoints/checkpoint-latest.pth at step 3" in resumed
    assert yaml.safe_load(resumed)["train"]["blr"] == 0.01
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]

    # a finished (here: max_steps) run started again trains nothing and says so
    assert pretrain(*tiny(data, out, "train.max_steps=5", "train.blr=0.01", "train.resume_allow=[train.blr]")) == 0
    again = capsys.readouterr().out
    assert "nothing to train: the run is at step 5/" in again and "train.max_steps=5" in again and "nan" not in again
    assert (out / "config.resume-2.yaml").is_file() and [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    log = (out / "log.txt").read_text()
    assert log.count("===== ") == 8 and "error: cannot resume from" in log and "total: " in log


def test_steps_logged_after_the_last_checkpoint_appear_once(root, tmp_path):
    """A run killed after logging steps 4-6 but before their checkpoint trains them again: the
    metrics (JSON lines and TensorBoard) hold every step once, with the resumed values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, out = root / "train", tmp_path / "run"
    knn = [f"eval.knn.train={data}", f"eval.knn.val={data}", "eval.knn.k=3", "train.eval_every_steps=3"]
    assert pretrain(*tiny(data, out, "train.max_steps=6", "train.save_every_steps=3", *knn)) == 0
    first = metrics(out)
    ckpts = out / "checkpoints"
    os.remove(ckpts / "checkpoint-00000006.pth")                          # the kill: step 6's checkpoint is lost
    os.replace(ckpts / "checkpoint-00000003.pth", ckpts / "checkpoint-latest.pth")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.0')                                  # and a torn line
    assert pretrain(*tiny(data, out, "train.max_steps=6", "train.save_every_steps=3", *knn)) == 0
    again = metrics(out)
    assert [r["step"] for r in again if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in again if "knn_top1" in r] == [3, 6]
    untimed = [[{k: v for k, v in r.items() if k not in ("images_per_s", "wall_s")} for r in m] for m in (first, again)]
    assert untimed[0] == untimed[1]                                         # the same steps, bit for bit
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("eval/knn_top1")] == [3, 6]
    assert not any(t.startswith("train/knn") for t in acc.Tags()["scalars"])


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "knn_top1": 5}\n{"step": 3}\n{"step": 2')
    assert truncate_metrics(str(path), 2) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2, "knn_top1": 5}\n'
    assert truncate_metrics(str(path), 2) == 0 and truncate_metrics(str(tmp_path / "none"), 0) == 0


def test_print_config_dry_run_and_per_gpu_batch(root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = tiny(root / "train", out, "train.per_gpu_batch_size=2", "train.accum_steps=2", "train.blr=2e-4")
    assert pretrain(*argv, "--print-config") == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# python -m pretrain ")
    assert "  batch_size: 4\n" in printed                # per_gpu_batch_size x processes x accum, as the run uses
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert load_config(PretrainConfig, str(saved)) == load_config(PretrainConfig, None, argv + ["train.batch_size=4"])
    assert pretrain(*argv, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "global batch 4 = 2 per process x 1 process(es) x 2 accumulation step(s) (from train.per_gpu_batch_size)" \
        in text
    assert "total: " in text and "dry run: the config, curriculum, data and checkpoints check out" in text
    assert not out.exists()                                                 # a dry run writes nothing
    assert pretrain(*argv, "train.max_steps=1") == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["batch_size"] == 4 and cfg["train"]["per_gpu_batch_size"] == 2
    saving = json.loads((out / "plan.json").read_text())["planned_saving"]      # pixels beside measured FLOPs
    assert saving["pixel_saving"] == pytest.approx(1.0) and saving["flops_ratio"]["32"] == 1.0
    assert 0.25 < saving["flops_ratio"]["16"] < 0.5 and saving["flops_saving"] < 1.0
    assert cfg["train"]["output_dir"] == str(out)        # the record names its run: --config out/config.yaml resumes
    header = (out / "config.yaml").read_text().splitlines()
    assert header[0] == "# command: python -m pretrain " + " ".join(argv + ["train.max_steps=1"]) + f"  (in {os.getcwd()})"
    assert header[1].startswith("# git: ")
    # a dry run of a demo config whose set is not generated yet writes nothing either
    demo = tmp_path / "demo_data"
    assert pretrain(*tiny(demo, tmp_path / "d", "data.demo=true"), "--dry-run") == 0
    assert f"dry run: the real run would generate the synthetic demo image set in {demo} (1200 images)" \
        in capsys.readouterr().out
    assert not demo.exists() and not (tmp_path / "d").exists()


# ---- fine-tuning ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder(root, tmp_path_factory):
    """An encoder export of our pretraining (patch 8, width 32, depth 1, 32 px), stopped by max_steps."""
    out = tmp_path_factory.mktemp("pre") / "run"
    assert pretrain(*tiny(root / "train", out, "train.max_steps=2")) == 0
    return out / "encoder.pth"


def ft(root, out, *extra):
    return finetune_main.main([f"data.path={root}", "data.num_workers=0", "model.num_classes=4", "model.drop_path=0",
                               "curriculum.epochs=1", "train.batch_size=8", "train.warmup_epochs=0",
                               "train.progress=false", f"train.output_dir={out}", *map(str, extra)])


def test_finetune_user_errors_exit_2(root, encoder, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    cases = [
        (["model.checkpoint=/path/to/encoder.pth"], "model.checkpoint '/path/to/encoder.pth' does not exist"),
        ([f"model.checkpoint={junk}"], f"model.checkpoint '{junk}' is not a PyTorch checkpoint: it is a text file "
                                       "starting with 'not a checkpoint' (16 bytes); expected a file written by "
                                       "torch.save"),
        ([f"model.checkpoint={tmp_path}"], f"model.checkpoint '{tmp_path}' is a folder; expected"),
        ([f"model.checkpoint={encoder}", "model.name=vit_small_patch16_224"],
         f"model.checkpoint '{encoder}' does not fit VisionTransformer: shape mismatches"),
        ([f"model.checkpoint={encoder}", "model.name=vit_smal_patch16_224"], "did you mean vit_small_patch16_224"),
        (["mode=train", "model.name=auto"], "model.name=auto takes the architecture from model.checkpoint"),
        ([f"model.checkpoint={encoder}", "train.batch_size=6", "train.accum_steps=2"],
         "need an even per-process micro-batch"),
        ([f"model.checkpoint={encoder}", "eval.max_batches=0"], "eval.max_batches must be >= 1"),
        (["--finetune", str(encoder)], f"use model.checkpoint={encoder}"),
        (["--model", "vit_base_patch16_224"], "use model.name=vit_base_patch16_224"),
        ([f"model.checkpoint={encoder}", f"data.path={tmp_path}/nodata"],
         f"'{tmp_path}/nodata/val' (data.path + data.val_dir) is not a folder"),
        ([f"model.checkpoint={encoder}", "data.randaug=rand-x9"], "data.randaug: 'rand-x9' is not a timm RandAugment"),
        ([f"model.checkpoint={encoder}", "data.scale=[0.5]"], "data.scale must be [min, max]"),
        ([f"model.checkpoint={encoder}", "model.global_pool=tok"], "model.global_pool: 'tok' is not allowed"),
        (["mode=eval", f"model.checkpoint={encoder}"], "does not fit vit_tiny_patch16_224 (mode=eval loads a "
                                                      "fine-tuned or probed checkpoint strictly): missing "),
    ]
    for extra, message in cases:
        assert ft(root, tmp_path / "ft", *extra) == 2, extra
        err = err_of(capsys)
        assert message in err, (extra, err)


def test_finetune_checks_before_the_data_scan(root, encoder, tmp_path, capsys, monkeypatch):
    def scan(*a, **k):
        raise AssertionError("the data folders were scanned before the check")
    monkeypatch.setattr(finetune_main, "image_folder", scan)
    for extra, message in (([f"model.checkpoint={tmp_path}/none.pth"], "does not exist"),
                           ([f"model.checkpoint={encoder}", "model.name=vit_small_patch16_224"], "does not fit"),
                           ([f"model.checkpoint={encoder}", "curriculum.name=etpp"], "trains at the final size"),
                           ([f"model.checkpoint={encoder}", "train.batch_size=6", "train.accum_steps=4"],
                            "batch size 6 is not divisible by accum_steps 4"),
                           ([f"model.checkpoint={encoder}", "train.batch_size=6", "train.accum_steps=2"],
                            "need an even per-process micro-batch")):
        assert ft(root, tmp_path / "ft", *extra) == 2, extra
        assert message in err_of(capsys), extra


def test_finetune_reads_the_architecture_from_our_checkpoint(root, encoder, tmp_path, capsys):
    out = tmp_path / "ft"
    assert ft(root, out, f"model.checkpoint={encoder}", "--print-config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["name"] == "auto" and printed["model"]["img_size"] is None   # resolved when it runs
    assert printed["train"]["batch_size"] == 8 and printed["eval"] == {"max_batches": None, "size": "stage"}
    assert ft(root, out, f"model.checkpoint={encoder}", "--dry-run") == 0
    text = capsys.readouterr().out
    assert (f"architecture from {encoder}: model.name=vit_tiny_patch16_224 model.kwargs={{'patch_size': 8, "
            f"'embed_dim': 32, 'depth': 1, 'num_heads': 2}} model.img_size=32") in text
    assert "dry run:" in text and not out.exists()
    assert ft(root, out, f"model.checkpoint={encoder}", "train.max_steps=2", "eval.max_batches=1") == 0
    text = capsys.readouterr().out
    assert "validation at 32px (first 1 batch(es) per process: eval.max_batches)" in text
    cfg = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert cfg["name"] == "vit_tiny_patch16_224" and cfg["img_size"] == 32 and cfg["kwargs"]["depth"] == 1
    # the fine-tuned checkpoint records its own architecture: mode=eval needs nothing else
    best = out / "checkpoints" / "checkpoint-latest.pth"
    assert ft(root, tmp_path / "ev", "mode=eval", f"model.checkpoint={best}", "eval.max_batches=1") == 0
    assert f"eval {best}: top-1" in (text := capsys.readouterr().out)
    assert "(8 images of 12, eval.max_batches=1)" in text


def test_resolve_architecture_of_files_without_metadata():
    sd = timm.create_model("vit_small_patch16_224", patch_size=8, depth=2, img_size=64).state_dict()
    cfg = ClassifierConfig(checkpoint="official.pth")
    assert resolve_architecture(cfg, {"model": sd}) == ("from official.pth: model.name=vit_small_patch16_224 "
                                                        "model.kwargs={'patch_size': 8, 'depth': 2} model.img_size=64")
    # explicit values are kept; the user's kwargs win over the derived ones
    cfg = ClassifierConfig(checkpoint="x.pth", img_size=96, kwargs={"depth": 3})
    resolve_architecture(cfg, {"model": sd})
    assert (cfg.name, cfg.img_size, cfg.kwargs) == ("vit_small_patch16_224", 96, {"patch_size": 8, "depth": 3})
    cfg = ClassifierConfig(name="resnet18")
    assert resolve_architecture(cfg, None) == "from the defaults: model.img_size=224" and cfg.name == "resnet18"


def test_eval_max_batches_stops_early():
    model = torch.nn.Identity()
    good = (torch.eye(4), torch.arange(4))                    # logits = one-hot of the label: all right
    bad = (torch.eye(4), torch.tensor([1, 2, 3, 0]))          # all wrong at top-1
    loader = [good, bad, bad]
    assert evaluate(model, loader, torch.device("cpu"), max_batches=1)["top1"] == 100.0
    assert evaluate(model, loader, torch.device("cpu"))["top1"] == pytest.approx(100 / 3)


def test_log_txt_keeps_stderr_lines_and_drops_progress_redraws(tmp_path):
    import io

    from engine.run import _Tee

    log, screen = io.StringIO(), io.StringIO()
    err = _Tee(screen, log, skip_redraws=True)
    err.write("first warning")
    err.write("\n")                          # print(..., file=sys.stderr) writes the newline apart
    err.write("\r  5%|#    | 1/20")
    err.write("\r100%|#####| 20/20")
    err.write("\n")                          # the bar's closing newline
    err.write("second\n")
    assert log.getvalue() == "first warning\nsecond\n"
    assert screen.getvalue().count("\r") == 2


def test_runs_from_before_a_key_existed_resume_with_its_old_meaning():
    from engine.resume import changed_settings

    saved = {"model": {"name": "deit_small_patch16_224"}, "train": {"blr": 1e-3}}      # no model.resize yet
    assert changed_settings(saved, {"model": {"name": "deit_small_patch16_224", "resize": "forward"},
                                    "train": {"blr": 1e-3}}) == []
    assert changed_settings(saved, {"model": {"name": "deit_small_patch16_224", "resize": "official"},
                                    "train": {"blr": 1e-3}}) == [("model.resize", "forward", "official")]
