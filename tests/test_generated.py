"""Nothing lost: the demo image generator writes only into a missing folder or one it generated
(engine/generated.py's marker), never deletes a user's file, and the dry runs of pretraining,
fine-tuning and evaluation reach the real run's verdict on the data (same exit code, same message)."""
import os
from pathlib import Path

import pytest

import evaluation.run_eval as run_eval
import finetune.main as finetune_main
import engine.demo_data as demo_data
import pretrain.main as pretrain_main
from engine.data import DataError
from engine.demo_data import demo_dataset_status, generate_demo_dataset
from engine.generated import MARKER, Generated, check_target, remove_generated

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder):
    """Every file under ``folder`` (relative path -> bytes): what must survive a refused call."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def count_images(folder):
    return len(list(Path(folder).rglob("*.png")))


@pytest.fixture
def users_folder(tmp_path):
    """A user's data folder: an image tree and a note."""
    from PIL import Image

    folder = tmp_path / "mydata"
    (folder / "cats").mkdir(parents=True)
    Image.new("RGB", (20, 20), (10, 200, 30)).save(folder / "cats" / "tom.png")
    (folder / "precious.txt").write_text("five years of notes\n")
    return folder


def test_demo_image_set_refuses_a_users_folder_and_leaves_it_byte_identical(users_folder, tmp_path):
    before = snapshot(users_folder)
    for call in (lambda p: generate_demo_dataset(str(p), num_images=8, size=32),
                 lambda p: generate_demo_dataset(str(p), num_images=8, size=32, reuse_any=True),
                 lambda p: demo_dataset_status(str(p), 8, 32)):
        with pytest.raises(DataError, match=f"data.path '{users_folder}' exists and is not a generated demo set "
                                            r"\(it holds 2 entries: 'cats', 'precious.txt'"):
            call(users_folder)
    assert snapshot(users_folder) == before
    assert sorted(os.listdir(tmp_path)) == ["mydata"]               # no temporary folder left beside it
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="it is an empty folder.*set data.demo=false to use that folder as your "
                                        "data, or choose another data.path"):
        generate_demo_dataset(str(empty), num_images=8, size=32)
    assert empty.is_dir() and not any(empty.iterdir())
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(DataError, match="it is a file"):
        generate_demo_dataset(str(a_file), num_images=8, size=32)
    assert a_file.read_text() == "mine"


def test_demo_image_set_regenerates_only_its_own_files(tmp_path, capsys):
    target = tmp_path / "demo"
    generate_demo_dataset(str(target), num_images=8, size=32)
    out = capsys.readouterr().out
    assert f"generating the synthetic demo image set in {target} (8 images): data.path is not the demo's own " \
           "data/demo" in out
    assert (target / MARKER).is_file() and count_images(target) == 8
    assert demo_dataset_status(str(target), 8, 32) == "ready"
    generate_demo_dataset(str(target), num_images=8, size=32)      # a no-op
    assert capsys.readouterr().out == ""
    generate_demo_dataset(str(target), num_images=12, size=32)     # other settings: regenerated in place
    assert "regenerating the synthetic demo image set" in capsys.readouterr().out
    assert count_images(target) == 12 and sorted(os.listdir(tmp_path)) == ["demo"]
    # a user's file dropped into the generated set blocks its regeneration, and survives
    mine = target / "train" / "disc" / "my_photo.png"
    mine.write_bytes(b"not the generator's")
    before = snapshot(target)
    with pytest.raises(DataError, match=f"is a demo set the toolkit generated, but it also holds '{mine}', which "
                                        "the generator did not write; regenerating would delete it"):
        generate_demo_dataset(str(target), num_images=8, size=32)
    with pytest.raises(DataError, match="which the generator did not write"):
        demo_dataset_status(str(target), 8, 32)                     # the dry runs' verdict
    assert snapshot(target) == before
    assert generate_demo_dataset(str(target), reuse_any=True) == str(target)   # kept: nothing to delete
    assert snapshot(target) == before


def test_an_older_demo_set_without_the_marker_is_still_ours(tmp_path):
    """Sets generated before the marker existed (stamp only) are reused and regenerated; with a
    user's file inside they are not recognised as ours at all."""
    target = tmp_path / "demo"
    generate_demo_dataset(str(target), num_images=8, size=32)
    (target / MARKER).unlink()
    assert demo_dataset_status(str(target), 8, 32) == "ready"
    generate_demo_dataset(str(target), num_images=12, size=32)
    assert count_images(target) == 12 and (target / MARKER).is_file()
    (target / MARKER).unlink()
    (target / "val" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not a generated demo set"):
        generate_demo_dataset(str(target), num_images=8, size=32)
    assert (target / "val" / "notes.txt").read_text() == "mine" and count_images(target) == 12


def test_an_interrupted_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def boom(rng, img, label):
        calls.append(label)
        if len(calls) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(demo_data, "_foreground", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(str(tmp_path / "demo"), num_images=8, size=32)
    assert os.listdir(tmp_path) == []                    # neither the target nor its temporary folder


def test_removal_needs_the_marker_and_only_the_generators_files(tmp_path):
    gen = Generated(what="test set", key="out", by="the test", advice="pick another out",
                    owns=lambda rel: rel.endswith(".bin"))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.bin").write_bytes(b"1")
    with pytest.raises(DataError, match="out '.*plain' exists and is not a generated test set"):
        remove_generated(str(plain), gen)
    assert (plain / "a.bin").read_bytes() == b"1"
    ours = tmp_path / "ours"
    (ours / "sub").mkdir(parents=True)
    (ours / MARKER).write_text("")
    (ours / "sub" / "a.bin").write_bytes(b"1")
    os.symlink(plain, ours / "sub" / "link")                         # a link is never the generator's
    with pytest.raises(DataError, match="also holds '.*ours/sub/link'"):
        remove_generated(str(ours), gen)
    assert (plain / "a.bin").exists()
    (ours / "sub" / "link").unlink()
    assert check_target(str(ours), gen) == "ours" and check_target(str(tmp_path / "none"), gen) == "missing"
    remove_generated(str(ours), gen)
    assert not ours.exists() and plain.exists()


# ---- the command lines: the dry run's verdict is the real run's ------------------------------------
def tiny_pretrain(data, out, *extra):
    return [f"data.path={data}", "data.demo=true", "data.demo_images=20", "data.num_workers=0",
            "data.replay_chunks=2", "model.arch=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
            "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=16",
            "model.decoder_depth=1", "model.decoder_num_heads=2", "curriculum.name=etpp", "curriculum.epochs=1.5",
            "train.batch_size=8", "train.warmup_epochs=0.2", "train.progress=false", f"train.output_dir={out}",
            *map(str, extra)]


def outcome(main, argv, capsys):
    """(exit code, stderr) of an in-process ``main``."""
    rc = main(list(map(str, argv)))
    return rc, capsys.readouterr().err


def test_pretrain_dry_run_and_real_run_refuse_a_users_folder_alike(users_folder, tmp_path, capsys):
    before = snapshot(users_folder)
    argv = ["--config", ROOT / "configs/pretrain/demo.yaml", f"data.path={users_folder}",
            f"train.output_dir={tmp_path / 'run'}"]
    dry = outcome(pretrain_main.main, [*argv, "--dry-run"], capsys)
    real = outcome(pretrain_main.main, argv, capsys)
    assert dry == real and dry[0] == 2
    assert dry[1].startswith(f"error: data.path '{users_folder}' exists and is not a generated demo set")
    assert snapshot(users_folder) == before


def test_pretrain_demo_at_a_new_path_says_it_writes_synthetic_data(tmp_path, capsys):
    new = tmp_path / "typo" / "imagenet"
    assert pretrain_main.main(tiny_pretrain(new, tmp_path / "d") + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (f"dry run: the real run would generate the synthetic demo image set in {new} (20 images): data.path "
            "is not the demo's own data/demo, and data.demo=true writes synthetic pictures there") in out
    assert not (tmp_path / "typo").exists() and not (tmp_path / "d").exists()
    assert pretrain_main.main(tiny_pretrain(new, tmp_path / "r", "train.max_steps=1")) == 0
    out = capsys.readouterr().out
    notice = out.index(f"generating the synthetic demo image set in {new} (20 images): data.path is not the demo's")
    assert notice < out.index("MAE mae_vit_tiny_patch16")             # said before the run starts
    assert count_images(new) == 20
    # the set is there now: the dry run plans on it
    assert pretrain_main.main(tiny_pretrain(new, tmp_path / "d") + ["--dry-run"]) == 0
    assert "dry run: the config, curriculum, data and checkpoints check out" in capsys.readouterr().out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A pretraining run of one step on a generated demo set: run dir with encoder.pth, and the set."""
    base = tmp_path_factory.mktemp("finished")
    data, run = base / "demo", base / "run"
    assert pretrain_main.main(tiny_pretrain(data, run, "train.max_steps=1")) == 0
    return {"run": run, "data": data}


def test_finetune_dry_run_and_real_run_refuse_a_users_folder_alike(finished_run, users_folder, tmp_path, capsys):
    before = snapshot(users_folder)
    argv = ["--config", ROOT / "configs/finetune/demo.yaml", f"model.checkpoint={finished_run['run'] / 'encoder.pth'}",
            f"data.path={users_folder}", f"train.output_dir={tmp_path / 'ft'}", "data.num_workers=0"]
    dry = outcome(finetune_main.main, [*argv, "--dry-run"], capsys)
    real = outcome(finetune_main.main, argv, capsys)
    assert dry == real and dry[0] == 2
    assert dry[1].startswith(f"error: data.path '{users_folder}' exists and is not a generated demo set")
    assert snapshot(users_folder) == before
    # a missing folder: the dry run says what the real run would write there, and writes nothing
    new = tmp_path / "new"
    assert finetune_main.main([*map(str, argv[:3]), f"data.path={new}", f"train.output_dir={tmp_path / 'ft'}",
                               "--dry-run"]) == 0
    assert f"dry run: the real run would generate the synthetic demo image set in {new}" in capsys.readouterr().out
    assert not new.exists()
    # any demo set of ours will do for fine-tuning: the pretraining demo's 20 images are kept
    assert finetune_main.main([*map(str, argv[:3]), f"data.path={finished_run['data']}",
                               f"train.output_dir={tmp_path / 'ft'}", "--dry-run"]) == 0
    assert "dry run: the config, checkpoint, curriculum and data check out" in capsys.readouterr().out


def test_evaluation_dry_run_checks_what_the_real_run_checks(finished_run, tmp_path, capsys):
    run, data = finished_run["run"], finished_run["data"]
    before = snapshot(run)
    assert run_eval.main([str(run), "--data", str(data), "--finetune-epochs", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"data: {data}/train (16 images) / {data}/val (4 images), 4 classes" in out
    assert "would score the weighted kNN rule" in out and "would fine-tune for 1 epochs" in out
    assert "dry run: the encoder and the data check out; nothing was extracted or written" in out
    assert snapshot(run) == before and not (run / "evaluation.json").exists()
    # the same verdict as the real run: a missing encoder, a folder that is no ImageFolder pair,
    # class folders that differ
    odd = tmp_path / "odd"
    for split, classes in (("train", ["a", "b"]), ("val", ["a", "c"])):
        for c in classes:
            (odd / split / c).mkdir(parents=True)
            (odd / split / c / "x.png").write_bytes((data / "val" / "disc").glob("*.png").__next__().read_bytes())
    for argv in ([str(tmp_path / "no_run")], [str(run), "--data", str(tmp_path / "nowhere")],
                 [str(run), "--data", str(odd)]):
        dry = outcome(run_eval.main, [*argv, "--dry-run"], capsys)
        real = outcome(run_eval.main, argv, capsys)
        assert dry == real and dry[0] == 2, argv
        assert dry[1].startswith("error: "), dry
    assert not (run / "evaluation.json").exists()
