"""A new user's mistakes, driven through the CLI as a subprocess: one line on stderr that names the input and
the next step, a non-zero exit, no traceback (unless --debug)."""
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from captioning.config import load_config, save_config
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioning", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env={**os.environ, **(env or {})}, timeout=timeout)


def assert_one_line_error(result, *words, code=2):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and lines, result.stderr
    for word in words:
        assert word in lines[-1], (word, lines[-1])


# ---------------------------------------------------------------- checkpoints

def test_a_run_directory_as_checkpoint_uses_its_best_pt_and_says_so(tiny_run, shapes_dir):
    image = next((shapes_dir / "flickr30k_images").iterdir())
    result = cli("caption", "--checkpoint", tiny_run, "--precision", "fp32", image)
    assert result.returncode == 0 and result.stdout.startswith(str(image))
    assert f"using {tiny_run / 'best.pt'}" in result.stderr


def test_a_directory_without_best_pt_is_named_with_what_to_pass(tmp_path, shapes_dir):
    result = cli("caption", "--checkpoint", tmp_path, next((shapes_dir / "flickr30k_images").iterdir()))
    assert_one_line_error(result, str(tmp_path), "is a directory", "best.pt")


@pytest.mark.parametrize("kind", ["csv", "image", "empty", "truncated"])
def test_a_file_that_is_not_a_checkpoint_is_named_and_never_advises_weights_only_false(kind, tmp_path, tiny_run,
                                                                                       shapes_dir):
    image = next((shapes_dir / "flickr30k_images").iterdir())
    bad = tmp_path / f"bad.{ {'csv': 'csv', 'image': 'png'}.get(kind, 'pt')}"
    if kind == "csv":
        bad.write_text("image,caption\na.jpg,a dog\n")
    elif kind == "image":
        shutil.copy(image, bad)
    elif kind == "empty":
        bad.touch()
    else:
        data = (tiny_run / "best.pt").read_bytes()
        bad.write_bytes(data[:len(data) // 2])
    result = cli("caption", "--checkpoint", bad, image)
    assert_one_line_error(result, "not a captioning checkpoint", str(bad))
    assert "weights_only" not in result.stderr


# ---------------------------------------------------------------- offline weights

def test_weights_that_cannot_be_downloaded_say_where_to_put_them_and_how_to_go_without(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    for i in range(12):
        Image.new("RGB", (40, 40), (20 * i, 0, 0)).save(images / f"{i}.png")
    (tmp_path / "c.csv").write_text("image,caption\n" + "".join(f"{i}.png,a red square\n" for i in range(12)))
    offline = ("import sys, urllib.error, torch.hub\n"
               "def refuse(*a, **k): raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')\n"
               "torch.hub.load_state_dict_from_url = refuse\n"
               "from captioning.cli.main import main\nsys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run(
        [sys.executable, "-c", offline, "train", "--config", "configs/flickr30k.yaml", "--set", "data.format=csv",
         "--set", f"data.images={images}", "--set", f"data.captions={tmp_path / 'c.csv'}", "--set", "data.min_freq=1",
         "--set", f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert_one_line_error(result, "could not download", "resnet152", str(Path(torch.hub.get_dir()) / "checkpoints"),
                          "--set model.pretrained=false", code=1)


# ---------------------------------------------------------------- moved data

def test_evaluate_finds_moved_data_with_set_and_says_how_when_it_cannot(tiny_run, shapes_dir, tmp_path):
    moved = shutil.copytree(shapes_dir, tmp_path / "moved")
    run = shutil.copytree(tiny_run, tmp_path / "run")
    cfg = load_config(run / "config.yaml", [f"data.images={tmp_path / 'gone'}",
                                            f"data.captions={tmp_path / 'gone.csv'}"], check_paths=False)
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["config"] = {**ckpt["config"], "data": {**ckpt["config"]["data"], "images": cfg.data.images,
                                                 "captions": cfg.data.captions}}
    torch.save(ckpt, run / "best.pt")                    # as if the data had moved since training
    lost = cli("evaluate", "--checkpoint", run / "best.pt", "--precision", "fp32", cwd=tmp_path)
    assert_one_line_error(lost, "--set data.images=", str(run / "best.pt"))
    found = cli("evaluate", "--checkpoint", run / "best.pt", "--precision", "fp32", "--set",
                f"data.images={moved / 'flickr30k_images'}", "--set", f"data.captions={moved / 'results.csv'}",
                cwd=tmp_path)
    assert found.returncode == 0 and "CIDEr" in found.stdout, found.stderr
    model_key = cli("evaluate", "--checkpoint", run / "best.pt", "--set", "model.d_model=64")
    assert_one_line_error(model_key, "data keys only", "model.d_model")


@pytest.mark.slow
def test_relative_paths_of_a_run_are_stored_absolute_with_the_originals_kept(shapes_dir, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(shapes_dir, work / "data")
    cfg = tiny_config(shapes_dir, "runs/r", "train.epochs=1", "data.images=data/flickr30k_images",
                      "data.captions=data/results.csv")
    save_config(cfg, work / "c.yaml")
    result = cli("train", "--config", "c.yaml", cwd=work)
    assert result.returncode == 0, result.stderr
    saved = (work / "runs/r/config.yaml").read_text()
    assert f"images: {work / 'data/flickr30k_images'}" in saved and "#   data.images: data/flickr30k_images" in saved
    ckpt = torch.load(work / "runs/r/best.pt", weights_only=True)
    assert ckpt["config"]["data"]["captions"] == str(work / "data/results.csv")
    assert ckpt["paths_given"]["data.captions"] == "data/results.csv"
    elsewhere = cli("evaluate", "--checkpoint", work / "runs/r/best.pt", "--precision", "fp32", cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stderr


# ---------------------------------------------------------------- resume

def test_resume_of_a_finished_run_says_how_to_train_longer_and_exits_0(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    result = cli("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert "finished at epoch 1 of 1" in result.stderr and "--set train.epochs=" in result.stderr


def test_resume_with_config_says_which_one_wins(tiny_run):
    result = cli("train", "--resume", tiny_run, "--config", "configs/shapes.yaml")
    assert_one_line_error(result, f"--resume {tiny_run}", "--config", "ignored", "--resume auto")


# ---------------------------------------------------------------- bad options

@pytest.mark.parametrize("args, named", [
    (["caption", "--checkpoint", "x.pt", "--batch-size", "0", "a.png"], "--batch-size"),
    (["caption", "--checkpoint", "x.pt", "--beam", "0", "a.png"], "--beam"),
    (["evaluate", "--checkpoint", "x.pt", "--beam", "0"], "--beam"),
    (["shapes", "out", "--images", "0"], "--images"),
    (["extract-features", "--config", "c.yaml", "--batch-size", "-3"], "--batch-size"),
])
def test_bad_options_fail_before_any_work(args, named, tmp_path):
    result = cli(*args, cwd=tmp_path)
    assert_one_line_error(result, named, "at least 1")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_says_cpu_runs(tmp_path):
    result = cli("caption", "--checkpoint", "x.pt", "--device", "cuda", "a.png", cwd=tmp_path)
    assert_one_line_error(result, "no CUDA device is visible", "--device cpu")


# ---------------------------------------------------------------- Ctrl-C

def _sigint_default():
    """In the child before exec: Ctrl-C's default, which Python turns into KeyboardInterrupt. A process started
    in the background by a non-interactive shell (a CI job, say) inherits SIGINT ignored, and Python keeps that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_when(process: subprocess.Popen, ready, timeout: float = 120) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    return process.communicate(timeout=60)


@pytest.mark.slow
def test_ctrl_c_in_train_exits_130_naming_the_checkpoint_and_the_resume_command(shapes_dir, tmp_path):
    save_config(tiny_config(shapes_dir, tmp_path / "run", "train.epochs=50", "train.save_every=1"), tmp_path / "c.yaml")
    process = subprocess.Popen([sys.executable, "-m", "captioning", "train", "--config", tmp_path / "c.yaml"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               preexec_fn=_sigint_default)
    _, err = _interrupt_when(process, lambda: (tmp_path / "run" / "last.pt").exists())
    assert process.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"interrupted: the last checkpoint is {tmp_path / 'run' / 'last.pt'}; "
                                            f"continue with: python -m captioning train --resume {tmp_path / 'run'}")
    torch.load(tmp_path / "run" / "last.pt", weights_only=True)          # whole


@pytest.mark.slow
def test_ctrl_c_in_caption_exits_130_and_keeps_the_captions_already_printed(tiny_run, shapes_dir, tmp_path):
    images = sorted((shapes_dir / "flickr30k_images").iterdir()) * 40
    out = tmp_path / "out.jsonl"
    with open(out, "w") as f:
        process = subprocess.Popen([sys.executable, "-m", "captioning", "caption", "--checkpoint", tiny_run / "best.pt",
                                    "--json", "--batch-size", "4", "--precision", "fp32", *images], stdout=f,
                                   stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=_sigint_default)
        _, err = _interrupt_when(process, lambda: out.stat().st_size > 0)
    assert process.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    lines = out.read_text().splitlines()
    assert 0 < len(lines) < len(images) and all(json.loads(line)["caption"] for line in lines)


# ---------------------------------------------------------------- writing where the user did not ask

def test_shapes_is_generated_only_into_a_new_or_empty_folder(tmp_path, shapes_dir):
    (tmp_path / "mine.txt").write_text("my file")
    cfg = tiny_config(shapes_dir, tmp_path / "run", f"data.images={tmp_path / 'flickr30k_images'}",
                      f"data.captions={tmp_path / 'result.csv'}")          # a typo: results.csv
    save_config(cfg, tmp_path / "c.yaml")
    result = cli("train", "--config", tmp_path / "c.yaml")
    assert_one_line_error(result, "data.captions", str(tmp_path / "result.csv"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "mine.txt"]
    result = cli("shapes", tmp_path, "--images", "10")
    assert_one_line_error(result, str(tmp_path), "not an empty folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "mine.txt"]


# ---------------------------------------------------------------- help

def test_help_teaches_what_it_is_with_an_example_of_each_command():
    text = cli("--help").stdout
    assert "examples:" in text and "An image captioner" in text
    for command in ("shapes", "train", "caption", "evaluate", "extract-features", "torchrun"):
        assert f"captioning {command}" in text or command == "torchrun" and "torchrun" in text


@pytest.mark.parametrize("command", ["train", "caption", "evaluate", "extract-features", "shapes"])
def test_every_option_has_help_text(command):
    from captioning.cli.main import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for action in sub.choices[command]._actions:
        assert action.help, (command, action.dest)
    text = cli(command, "--help").stdout
    assert "the reference" not in text.lower() and "issue" not in text.lower()
    if command == "evaluate":
        assert "splits.json" in text and "--set data.images=" in text


# ---------------------------------------------------------------- HTML instead of an image

def test_a_url_answering_html_says_the_server_returned_html(tiny_run):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<!DOCTYPE html><html><body>Log in to see this photo</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/photo/123"
        result = cli("caption", "--checkpoint", tiny_run / "best.pt", url)
    finally:
        server.shutdown()
    assert_one_line_error(result, url, "HTML page", "text/html", "HTTP 200", code=1)
