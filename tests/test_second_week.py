"""What breaks in a user's second week: finished runs whose data moved, empty captions, a results file
written twice, two jobs on one run directory or one results file, a kill while the results file is repaired."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from captioning import Captioner
from captioning.config import save_config
from captioning.data.images import expand_inputs
from captioning.data.shapes import build_shapes
from captioning.model.checkpoint import load_checkpoint, model_checkpoint, save_atomic
from captioning.train.run import train
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "captioning", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def photos(shapes_dir: Path, folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for image in sorted((shapes_dir / "flickr30k_images").iterdir())[:n]:
        shutil.copy(image, folder / image.name)
    return folder


# -----------------------------------------------------------------------------
# a finished run needs no data

def test_a_finished_run_whose_images_are_gone_says_it_finished_either_way(tmp_path):
    data = build_shapes(tmp_path / "shapes", 24, seed=0, progress=False)
    cfg = tiny_config(data, tmp_path / "run", "train.epochs=1", "data.format=flickr30k")   # no Shapes made anew
    run = train(cfg, progress=False)
    shutil.rmtree(data)                                                  # scratch storage was cleaned
    for args in (["--resume", run], ["--config", run / "config.yaml", "--resume", "auto"]):
        result = cli("train", *args)
        assert result.returncode == 0, result.stderr
        assert "finished at epoch 1" in result.stderr, result.stderr


# -----------------------------------------------------------------------------
# a caption is never empty

@pytest.fixture(scope="module")
def eager_to_stop(tiny_run, tmp_path_factory):
    """tiny_run's checkpoint with <eos> made the likeliest first word by far."""
    model, vocab, cfg = load_checkpoint(tiny_run / "best.pt")
    with torch.no_grad():
        model.head.bias[vocab.eos] += 50.0
    path = tmp_path_factory.mktemp("eager") / "best.pt"
    save_atomic(model_checkpoint(model, cfg, vocab), path)
    return path


MODES = {"greedy": {}, "beam": {"beam_size": 3}, "n-best": {"beam_size": 3, "num_captions": 3},
         "sampled": {"temperature": 1.0, "seed": 0, "num_captions": 2}, "top-k": {"top_k": 3, "seed": 1},
         "attention": {"attention": True}}


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_no_caption_is_empty_in_any_mode_on_either_engine(eager_to_stop, shapes_dir, tmp_path, engine):
    if engine == "torch":
        captioner = Captioner.from_checkpoint(eager_to_stop, precision="fp32", engine="torch")
    else:
        pytest.importorskip("onnxruntime")
        from captioning.decode.export import export
        export(eager_to_stop, tmp_path / "export")
        captioner = Captioner.from_export(tmp_path / "export")
    images = sorted((shapes_dir / "flickr30k_images").iterdir())[:3]
    for mode, options in MODES.items():
        for result in captioner.caption(images, **options):
            assert result.caption, (mode, result)
            assert all(c["caption"] for c in result.captions), (mode, result.captions)


# -----------------------------------------------------------------------------
# caption --out: each input exactly once, whatever happens

def rows_of(out: Path) -> list[dict]:
    text = out.read_text()
    assert text == "" or text.endswith("\n"), "a partial last line"
    return [json.loads(line) for line in text.splitlines()]


def test_caption_out_three_times_with_a_kill_in_the_first_writes_each_input_once(tiny_run, shapes_dir, tmp_path):
    folder = photos(shapes_dir, tmp_path / "photos", 40)
    out = tmp_path / "preds.jsonl"
    args = [sys.executable, "-m", "captioning", "caption", "--checkpoint", tiny_run / "best.pt", "--precision",
            "fp32", "--batch-size", "1", "--out", out, folder]
    first = subprocess.Popen(list(map(str, args)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 5):
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert out.read_text().count("\n") < 40, "the first run finished before it was killed: nothing was tested"
    for _ in range(2):
        result = cli("caption", "--checkpoint", tiny_run / "best.pt", "--precision", "fp32", "--out", out, folder)
        assert result.returncode == 0, result.stderr
    inputs = [row["input"] for row in rows_of(out)]
    assert sorted(inputs) == expand_inputs([folder]) and len(inputs) == 40


def test_a_done_row_is_done_and_an_error_is_retried_only_when_asked_then_replaced(tiny_run, shapes_dir, tmp_path):
    images = expand_inputs([photos(shapes_dir, tmp_path / "photos", 3)])
    out = tmp_path / "preds.jsonl"
    out.write_text(json.dumps({"input": images[0], "caption": ""}) + "\n"          # an earlier version's empty one
                   + json.dumps({"input": images[1], "error": "timed out"}) + "\n")
    base = ["caption", "--checkpoint", tiny_run / "best.pt", "--precision", "fp32", "--out", out, *images]
    result = cli(*base)
    assert result.returncode == 0 and "2 input(s) already in" in result.stderr, result.stderr
    rows = rows_of(out)
    assert [r["input"] for r in rows] == images and rows[1] == {"input": images[1], "error": "timed out"}
    result = cli(*base, "--retry-errors")
    assert result.returncode == 0, result.stderr
    rows = rows_of(out)
    assert sorted(r["input"] for r in rows) == images and all("error" not in r for r in rows)
    assert next(r for r in rows if r["input"] == images[1])["caption"]


def test_a_results_file_repaired_while_killed_loses_no_finished_row(tmp_path):
    """The repair is killed at moments in turn, and once by the system at its first write past 1 MB
    (RLIMIT_FSIZE's SIGXFSZ: a kill in the middle of writing, every time): no finished row is lost."""
    import resource

    out = tmp_path / "preds.jsonl"
    rows = "".join(json.dumps({"input": f"img{i:07d}.jpg", "caption": "a dog " * 8}) + "\n"
                   for i in range(200_000))
    code = ("import sys; from captioning.cli.results import ResultsFile; "
            "print('open', flush=True); ResultsFile(sys.argv[1]).close(); print('done', flush=True)")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    for delay in (None, 0.0, 0.01, 0.02, 0.04, 0.08, 0.16):
        out.write_text(rows + '{"input": "img_partial.jpg", "capt')          # a run killed mid-line
        process = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                                   text=True, preexec_fn=small_files if delay is None else None)
        assert process.stdout.readline() == "open\n"
        if delay is not None:
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
        process.wait()
        text = out.read_text()
        assert text.startswith(rows), f"rows lost (kill after {delay} s): {len(text)} of {len(rows)} bytes"


def test_caption_out_refuses_a_file_that_is_not_its_results(tiny_run, shapes_dir, tmp_path):
    image = expand_inputs([photos(shapes_dir, tmp_path / "photos", 1)])[0]
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\na.jpg,a dog runs\n")                 # training data, not results
    result = cli("caption", "--checkpoint", tiny_run / "best.pt", "--out", captions, image)
    assert result.returncode == 2 and str(captions) in result.stderr and "not a results file" in result.stderr
    assert captions.read_text() == "image,caption\na.jpg,a dog runs\n"
    broken = tmp_path / "preds.jsonl"
    broken.write_text(json.dumps({"input": "a.jpg", "caption": "a dog"}) + "\n{not json\n")
    result = cli("caption", "--checkpoint", tiny_run / "best.pt", "--out", broken, image)
    assert result.returncode == 2 and f"{broken}: line 2" in result.stderr, result.stderr


# -----------------------------------------------------------------------------
# one job at a time on a run directory or a results file

HOLD = ("import sys, time; from captioning.files import hold; "
        "lock = hold(sys.argv[1], sys.argv[2]); lock.__enter__(); print('held', flush=True); time.sleep(120)")


def held(path: Path, what: str) -> subprocess.Popen:
    """Another process that holds the lock of `path` until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path), what], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


def test_a_second_job_on_a_held_run_directory_is_refused_and_goes_on_once_the_holder_is_killed(shapes_dir, tmp_path):
    cfg = tiny_config(shapes_dir, tmp_path / "run", "train.epochs=1")
    save_config(cfg, tmp_path / "c.yaml")
    (tmp_path / "run").mkdir()
    holder = held(tmp_path / "run", "run directory")
    try:
        result = cli("train", "--config", tmp_path / "c.yaml", "--resume", "auto")
        assert result.returncode != 0 and not (tmp_path / "run" / "last.pt").exists()
        assert str(tmp_path / "run") in result.stderr and f"process {holder.pid} on {socket.gethostname()}" \
            in result.stderr, result.stderr
    finally:
        holder.send_signal(signal.SIGKILL)                                   # the holder dies: the lock goes too
        holder.wait()
    result = cli("train", "--config", tmp_path / "c.yaml", "--resume", "auto")
    assert result.returncode == 0 and (tmp_path / "run" / "last.pt").exists(), result.stderr


def test_a_second_caption_out_on_a_held_results_file_is_refused(tiny_run, shapes_dir, tmp_path):
    image = expand_inputs([photos(shapes_dir, tmp_path / "photos", 1)])[0]
    out = tmp_path / "preds.jsonl"
    holder = held(out, "results file")
    try:
        result = cli("caption", "--checkpoint", tiny_run / "best.pt", "--out", out, image)
        assert result.returncode != 0 and f"process {holder.pid}" in result.stderr and str(out) in result.stderr
        assert not out.exists() or out.read_text() == ""
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# -----------------------------------------------------------------------------
# smaller gaps

def test_credentials_in_a_url_are_never_printed(tiny_run):
    from captioning.data.images import describe
    assert describe("http://user:secret@127.0.0.1:9/x.jpg") == "http://127.0.0.1:9/x.jpg"
    result = cli("caption", "--checkpoint", tiny_run / "best.pt", "--json", "http://user:secret@127.0.0.1:9/x.jpg")
    assert result.returncode == 1 and "secret" not in result.stdout + result.stderr


def test_a_huge_max_tokens_is_refused_before_anything_is_allocated(shapes_dir, tmp_path):
    from captioning.config import ConfigError
    with pytest.raises(ConfigError, match="model.max_tokens"):
        tiny_config(shapes_dir, tmp_path / "run", "model.max_tokens=100000000")


def test_a_checkpoint_that_does_not_match_its_config_is_named(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    ckpt["config"]["model"]["d_model"] = 64
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="odd.pt") as error:
        load_checkpoint(tmp_path / "odd.pt")
    assert "\n" not in str(error.value)


def test_left_over_temporary_checkpoints_are_removed_when_a_run_starts(shapes_dir, tmp_path):
    (tmp_path / "run").mkdir()
    left = tmp_path / "run" / ".last.pt.k2j3.tmp"
    left.write_bytes(b"half a checkpoint")
    train(tiny_config(shapes_dir, tmp_path / "run", "train.epochs=1"), progress=False)
    assert not left.exists()


def test_a_glob_through_symlinked_folders_finds_each_image_once_and_loops_end(shapes_dir, tmp_path):
    folder = photos(shapes_dir, tmp_path / "d", 2)
    (folder / "again").symlink_to(folder, target_is_directory=True)          # a loop
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)     # a second loop
    found = expand_inputs([f"{folder}/**/*.png"]) + expand_inputs([folder])
    assert sorted({os.path.realpath(p) for p in found}) == sorted(os.path.realpath(p) for p in found[:2])
    assert len(expand_inputs([f"{folder}/**/*.png"])) == 2 and len(expand_inputs([folder])) == 2


def test_text_that_is_not_utf8_is_refused_with_its_file_and_line(tmp_path):
    from captioning.config import ConfigError, load_config
    from captioning.data.readers import read_captions
    kaggle = tmp_path / "results.csv"
    kaggle.write_bytes(b"image_name| comment_number| comment\n1.jpg| 0| a dog\n2.jpg| 0| caf\xe9 noir\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(b'{"image": "1.jpg", "caption": "caf\xe9"}\n')
    for path, fmt, line in ((kaggle, "flickr30k", 3), (jsonl, "jsonl", 1)):
        with pytest.raises(ValueError, match=f"{path}: line {line}: not UTF-8"):
            read_captions(path, fmt)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_bytes(b"seed: 0\nrun_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match=f"{yaml_file}: line 2: not UTF-8"):
        load_config(yaml_file)


RSS_OF_READING = """
import re, sys
from captioning.data.readers import read_captions
found = read_captions(sys.argv[1], sys.argv[2])
peak = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)  # since exec
print(len(found.captions), found.skipped, int(peak) // 1024)
"""


@pytest.mark.parametrize("fmt", ["flickr30k", "csv", "jsonl"])
def test_a_captions_file_with_one_enormous_line_is_read_in_little_memory(tmp_path, fmt):
    """A lost quote swallowed the rest of a 200 MB file into one row: the row is reported by its
    number and skipped, the others are read, and the reader never holds the file (peak RSS, MB)."""
    rows = {"flickr30k": ("image_name| comment_number| comment\n", "{}| 0| {}\n"),
            "csv": ("image,caption\n", "{},{}\n"), "jsonl": ("", '{{"image": "{}", "caption": "{}"}}\n')}
    header, row = rows[fmt]
    path = tmp_path / f"captions.{'jsonl' if fmt == 'jsonl' else 'csv'}"
    with open(path, "w") as f:
        f.write(header + row.format("1.jpg", "a dog"))
        start, end = row.format("2.jpg", "\0").split("\0")
        f.write(start)
        for _ in range(200):
            f.write("very " * 200_000)                                   # 200 MB of one caption
        f.write(end)
        f.write(row.format("3.jpg", "a cat"))
    size_mb = path.stat().st_size >> 20
    out = subprocess.run([sys.executable, "-c", RSS_OF_READING, str(path), fmt], capture_output=True,
                         text=True, check=True).stdout.split(maxsplit=1)
    images, rest = int(out[0]), out[1]
    skipped, rss_mb = rest.rsplit(maxsplit=1)
    assert images == 2 and "over 65536 bytes" in skipped and ("line 3" in skipped or "line 2" in skipped)
    assert size_mb >= 190 and int(rss_mb) < 3 * size_mb, (rss_mb, size_mb)


def test_images_shrink_to_the_models_input_as_they_open(tiny_run, tmp_path):
    from PIL import Image
    big = tmp_path / "big.png"
    Image.new("I;16", (1200, 900), 30000).save(big)
    captioner = Captioner.from_checkpoint(tiny_run / "best.pt", precision="fp32")
    side = captioner.cfg.data.image_size
    assert captioner._open(big).size == (side, side)
    assert captioner.caption([big])[0].caption == captioner.caption([Image.open(big)])[0].caption


def test_a_full_disk_is_named_not_a_torch_internal(tmp_path, monkeypatch):
    import errno

    from captioning.config import EnvironmentProblem
    from captioning.files import write_atomic

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(EnvironmentProblem, match=f"no space left on device writing {tmp_path / 'a.pt'}"):
        write_atomic(tmp_path / "a.pt", full)

    class Statvfs:                                  # torch.save's own error, on a disk with 1 MB left
        f_bavail, f_frsize = 256, 4096
    monkeypatch.setattr("captioning.files.os.statvfs", lambda path: Statvfs())

    def torch_full(f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                           "writing file data/0: file write failed")
    with pytest.raises(EnvironmentProblem, match="no space left on device writing"):
        write_atomic(tmp_path / "b.pt", torch_full)
    assert list(tmp_path.iterdir()) == []                        # no temporary file left behind


def test_score_counts_empty_predictions_in_one_warning(tmp_path, caplog):
    import logging

    from captioning.eval.evaluate import score
    refs = tmp_path / "refs.csv"
    refs.write_text("image,caption\na.jpg,a dog runs\nb.jpg,a cat sits\n")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"image": "a.jpg", "caption": "a dog"}) + "\n"
                     + json.dumps({"image": "b.jpg", "caption": ""}) + "\n")
    with caplog.at_level(logging.WARNING):
        report = score(preds, refs)
    [warning] = [r.getMessage() for r in caplog.records if "empty" in r.getMessage()]
    assert "1 prediction(s)" in warning and "b.jpg" in warning and len(report["predictions"]) == 2
