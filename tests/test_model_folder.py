"""Model folders (captioner/folder.py, model_card.py, cli/save.py): `save` writes model.safetensors, config.json,
vocab.json and a model card; `Captioner.from_pretrained` and `caption --model` read them back and give the
checkpoint's captions exactly; damaged folders get one line naming the file; hub ids go through huggingface_hub."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load, load_file

from captioning import Captioner
from captioning.captioner import folder as model_folder
from captioning.captioner.folder import ModelFolderError, load_model_folder, save_checkpoint
from captioning.cli.main import main
from captioning.config import EnvironmentProblem
from captioning.model.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def saved(tiny_run, tmp_path_factory):
    """The tiny run's best.pt as a model folder (written once for the module; tests copy it to change it)."""
    return save_checkpoint(tiny_run / "best.pt", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "tiny")


@pytest.fixture(scope="module")
def images(shapes_dir):
    return sorted((shapes_dir / "flickr30k_images").glob("*.png"))[:6]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_save_writes_weights_config_vocab_and_a_card(tiny_run, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "model.safetensors", "vocab.json"]
    ckpt = read_checkpoint(tiny_run / "best.pt")
    weights = load_file(saved / "model.safetensors")
    assert weights.keys() == ckpt["model"].keys()                       # the model's tensors, nothing else
    assert all(torch.equal(weights[k], ckpt["model"][k]) for k in weights)
    assert json.loads((saved / "vocab.json").read_text()) == ckpt["vocab"]
    config = json.loads((saved / "config.json").read_text())
    assert config["model"] == {**ckpt["config"]["model"]}
    assert config["preprocessing"]["image_size"] == ckpt["config"]["data"]["image_size"]
    assert config["decoding"]["max_words"] == ckpt["config"]["data"]["max_words"]
    assert config["source"]["epoch"] == ckpt["epoch"] and config["vocab_size"] == len(ckpt["vocab"])
    meta = front_matter((saved / "README.md").read_text())
    assert meta["pipeline_tag"] == "image-to-text" and meta["library_name"] == "captioning"
    assert meta["license"] == "unknown" and "image-captioning" in meta["tags"]
    assert meta["datasets"] == ["shapes-synthetic"]
    assert "model-index" not in meta                                   # the tiny run has no evaluate report


def test_the_card_tells_what_the_model_is_and_its_limits(saved, tiny_run):
    card = (saved / "README.md").read_text()
    env = json.loads((tiny_run / "env.json").read_text())
    assert "resnet18" in card and "d_model 32" in card and "Shapes images only" in card
    assert "No `evaluate` report" in card and "Captioner.from_pretrained" in card
    assert f"torch {env['torch']}" in card and "for 1 epochs" in card


def captions(captioner, images, **options):
    return [(r.caption, r.captions, r.words) for r in captioner.caption(images, **options)]


@pytest.mark.parametrize("options", [{}, {"beam_size": 3}, {"beam_size": 3, "num_captions": 3},
                                     {"temperature": 1.0, "top_k": 5, "seed": 7, "num_captions": 2},
                                     {"attention": True}, {"beam_size": 2, "attention": True}],
                         ids=["greedy", "beam", "n-best", "sampling", "attention", "beam-attention"])
def test_a_model_folder_gives_the_checkpoints_captions_exactly(tiny_run, saved, images, options):
    ours = Captioner.from_pretrained(saved, engine="torch", precision="fp32")
    theirs = Captioner.from_checkpoint(tiny_run / "best.pt", engine="torch", precision="fp32")
    a, b = ours.caption(images, **options), theirs.caption(images, **options)
    assert [(r.caption, r.captions, r.words) for r in a] == [(r.caption, r.captions, r.words) for r in b]
    if options.get("attention"):
        assert all(np.array_equal(x.attention, y.attention) for x, y in zip(a, b))
    # and not by accident: other weights of the same shapes give other scores
    model, vocab, cfg, _ = load_model_folder(saved)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p))
    other = Captioner(model, vocab, cfg, precision="fp32").caption(images, **options)
    assert [r.captions for r in other] != [r.captions for r in a]


def test_save_pretrained_writes_a_folder_that_loads_the_same(tiny_run, tmp_path, images):
    captioner = Captioner.from_checkpoint(tiny_run / "best.pt", engine="torch", precision="fp32")
    folder = captioner.save_pretrained(tmp_path / "m", checkpoint=tiny_run / "best.pt")
    again = Captioner.from_pretrained(folder, engine="torch", precision="fp32")
    assert captions(again, images, beam_size=2) == captions(captioner, images, beam_size=2)
    assert json.loads((folder / "config.json").read_text())["source"]["checkpoint"] == "best.pt"


def test_save_pretrained_refuses_weights_cast_below_fp32(tiny_run, tmp_path):
    captioner = Captioner.from_checkpoint(tiny_run / "best.pt", engine="torch", precision="bf16")
    with pytest.raises(ValueError, match="not all fp32"):
        captioner.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def one_line_error(folder, capsys, image) -> str:
    """`caption --model folder image`: exit status 2 and one line on stderr, no traceback."""
    assert main(["caption", "--model", str(folder), "--engine", "torch", str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_a_truncated_or_corrupted_weights_file_is_one_line_naming_it(copy, capsys, images):
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    assert "model.safetensors" in one_line_error(copy, capsys, images[0])
    weights.write_bytes(data[:1000] + bytes(b ^ 0xFF for b in data[1000:1100]) + data[1100:])
    assert "model.safetensors: its sha256" in one_line_error(copy, capsys, images[0])
    config = json.loads((copy / "config.json").read_text())
    del config["weights"]["sha256"]                  # without the recorded hash, safetensors' own check
    (copy / "config.json").write_text(json.dumps(config))
    weights.write_bytes(data[:len(data) - 100])
    with pytest.raises(ModelFolderError, match="model.safetensors: damaged or truncated"):
        load_model_folder(copy)


def test_a_pickle_in_place_of_the_weights_is_refused(copy, capsys, images):
    state = load((copy / "model.safetensors").read_bytes())      # not load_file: its tensors map the file
    torch.save(state, copy / "model.safetensors")
    assert "refused" in one_line_error(copy, capsys, images[0])
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    err = one_line_error(copy, capsys, images[0])
    assert "model.safetensors: missing" in err and "pytorch_model.bin is a pickle, refused" in err


def test_a_config_of_another_model_size_is_one_line_naming_it(copy, capsys, images):
    config = json.loads((copy / "config.json").read_text())
    config["model"]["d_model"] = 16
    (copy / "config.json").write_text(json.dumps(config))
    err = one_line_error(copy, capsys, images[0])
    assert "config.json: describes another model than model.safetensors holds" in err


def test_a_missing_vocab_is_one_line_naming_it(copy, capsys, images):
    (copy / "vocab.json").unlink()
    assert "vocab.json: missing" in one_line_error(copy, capsys, images[0])


def test_caption_model_takes_a_model_folder(saved, capsys, images):
    assert main(["caption", "--model", str(saved), "--engine", "torch", "--json", *map(str, images[:2])]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = Captioner.from_pretrained(saved, engine="torch").caption(images[:2])
    assert [line["caption"] for line in lines] == [r.caption for r in expected]


def test_caption_model_folder_takes_device_and_precision_and_an_export_refuses_them(saved, tiny_run, tmp_path,
                                                                                    capsys, images):
    assert main(["caption", "--model", str(saved), "--device", "cpu", "--precision", "fp32", "--engine", "torch",
                 "--json", str(images[0])]) == 0
    assert json.loads(capsys.readouterr().out)["caption"]
    assert main(["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(tmp_path / "export")]) == 0
    capsys.readouterr()
    assert main(["caption", "--model", str(tmp_path / "export"), "--precision", "bf16", str(images[0])]) == 2
    assert "is an export: it runs on the CPU in its own precision" in capsys.readouterr().err


def test_caption_out_names_a_hub_model_by_its_snapshot(saved, monkeypatch, images, tmp_path, capsys):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, revision=None, allow_patterns=None:
                        str(saved))
    out = tmp_path / "c.jsonl"
    assert main(["caption", "--model", "someone/tiny-shapes", "--engine", "torch", "--out", str(out),
                 str(images[0])]) == 0
    assert json.loads(out.read_text())["model"].startswith(f"{saved.name}/@")


def test_a_hub_id_goes_through_snapshot_download(saved, monkeypatch, images):
    import huggingface_hub
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(saved)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    captioner = Captioner.from_pretrained("someone/tiny-shapes", engine="torch", revision="v1", precision="fp32")
    assert calls == [("someone/tiny-shapes", "v1", ["model.safetensors", "config.json", "vocab.json", "README.md"])]
    assert captions(captioner, images) == captions(Captioner.from_pretrained(saved, engine="torch",
                                                                            precision="fp32"), images)


def test_a_hub_id_without_network_is_one_line_naming_it(tmp_path, images):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "captioning", "caption", "--model", "nobody/no-such-model",
                           str(images[0])], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert "nobody/no-such-model" in done.stderr and "could not be downloaded" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_hub_id_without_the_extra_says_what_to_install(monkeypatch):
    real = model_folder.importlib.util.find_spec
    monkeypatch.setattr(model_folder.importlib.util, "find_spec",
                        lambda name, *a: None if name == "huggingface_hub" else real(name, *a))
    with pytest.raises(EnvironmentProblem, match=r"pip install -e '\.\[hub\]'"):
        Captioner.from_pretrained("someone/tiny-shapes")


def test_save_push_to_hub_uploads_the_folder_it_wrote(tiny_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub, "upload_folder",
                        lambda **kw: calls.append(("upload", sorted(os.listdir(kw["folder_path"])), kw["repo_id"]))
                        or "https://huggingface.co/me/tiny/commit/1")
    out = tmp_path / "tiny"
    assert main(["save", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(out), "--push-to-hub", "me/tiny"]) == 0
    assert calls == [("create", "me/tiny", {"private": False, "exist_ok": True}),
                     ("upload", ["README.md", "config.json", "model.safetensors", "vocab.json"], "me/tiny")]
    assert "https://huggingface.co/me/tiny/commit/1" in capsys.readouterr().out


def test_save_refuses_an_existing_folder_and_a_bad_hub_id(tiny_run, saved, capsys):
    assert main(["save", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(saved)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["save", "--checkpoint", str(tiny_run / "best.pt"), "--out", "x", "--push-to-hub", "no id"])


def run_copy(tiny_run, tmp_path):
    """The tiny run's files in a folder of its own (so that a report written beside best.pt stays here)."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "splits.json", "env.json", "history.csv"):
        shutil.copy(tiny_run / name, run / name)
    return run


def test_the_card_gives_the_evaluate_reports_scores_and_split(tiny_run, tmp_path):
    from captioning.eval.evaluate import evaluate

    run = run_copy(tiny_run, tmp_path)
    report = evaluate(run / "best.pt", split="test", out=run / "test_predictions.json", java=False,
                      progress=False, precision="fp32")
    folder = save_checkpoint(run / "best.pt", tmp_path / "m")
    results = front_matter((folder / "README.md").read_text())["model-index"][0]["results"][0]
    assert results["dataset"]["split"] == "test" and results["task"]["type"] == "image-to-text"
    shown = {m["name"]: m["value"] for m in results["metrics"]}
    assert shown["BLEU-4"] == round(report["metrics"]["BLEU-4"], 4)
    assert shown["CIDEr-D"] == round(report["metrics"]["CIDEr"], 4)
    assert "METEOR" not in shown                                      # java=False: no METEOR, none shown
    assert f"{report['metrics']['images']} images" in (folder / "README.md").read_text()


def test_a_report_older_than_the_checkpoint_is_left_out(tiny_run, tmp_path):
    run = run_copy(tiny_run, tmp_path)
    (run / "old_report.json").write_text(json.dumps({"metrics": {"CIDEr": 1.0}, "predictions": []}))
    stamp = (run / "best.pt").stat().st_mtime
    os.utime(run / "old_report.json", (stamp - 60, stamp - 60))
    folder = save_checkpoint(run / "best.pt", tmp_path / "m")
    assert "model-index" not in front_matter((folder / "README.md").read_text())


def test_with_export_adds_onnx_folders_that_caption_without_the_weights(tiny_run, tmp_path, images):
    out = tmp_path / "m"
    assert main(["save", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(out), "--with-export"]) == 0
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["fp32", "int8"]
    assert json.loads((out / "config.json").read_text())["onnx"] == {"fp32": "onnx/fp32", "int8": "onnx/int8"}
    auto = Captioner.from_pretrained(out)                              # a CPU with onnxruntime: the fp32 export
    assert auto.model is None and type(auto.engine).__name__ == "OrtEngine"
    torch_side = Captioner.from_pretrained(out, engine="torch", precision="fp32")
    assert torch_side.model is not None
    assert [r.ok for r in auto.caption(images)] == [True] * len(images)
    int8 = Captioner.from_pretrained(out / "onnx" / "int8")
    assert int8.export["quantize"] == "int8" and all(r.ok for r in int8.caption(images))


@pytest.mark.slow
def test_the_inference_notebook_takes_a_model_folder(saved, images, tmp_path):
    papermill = pytest.importorskip("papermill")
    root = Path(__file__).resolve().parents[1]
    sources = [str(p) for p in images[:2]]
    nb = papermill.execute_notebook(str(root / "inference.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(root),
                                    parameters={"model": str(saved), "checkpoint": "", "images": sources,
                                                "beam_size": 2},
                                    kernel_name="python3", progress_bar=False)
    shown = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                    for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"{saved}: " in shown
    for result in Captioner.from_pretrained(saved).caption(sources, beam_size=2):
        assert result.caption in shown
