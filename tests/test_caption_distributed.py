"""`torchrun --nproc_per_node=N -m captioning caption --out FILE INPUTS`: the inputs spread over
processes, each rank's part merged into FILE in input order; a rank killed mid-run and the job run
again gives every input exactly once; an export's ranks never import torch; a rank that fails is named."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from captioning.data.images import expand_inputs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow     # several processes, each importing the package


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *args, timeout: int = 240, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                             f"--master_port={free_port()}", "-m", "captioning", "caption", *map(str, args)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def by_hand(n: int, *args, env=None):
    """The n ranks started as torchrun starts them (RANK, WORLD_SIZE, ...), without torchrun."""
    procs = []
    for rank in range(n):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(n),
                    "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(n)}
        procs.append(subprocess.Popen([sys.executable, "-m", "captioning", "caption", *map(str, args)], cwd=ROOT,
                                      env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=240), *p.communicate()) for p in procs]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def reference(captioner, inputs) -> list[str]:
    return [r.caption for r in captioner.caption(inputs, batch_size=4)]


@pytest.fixture(scope="module")
def photos(shapes_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for image in sorted((shapes_dir / "flickr30k_images").iterdir())[:11]:
        shutil.copy(image, folder / image.name)
    return folder


def test_two_ranks_from_a_checkpoint_give_one_process_s_captions_in_input_order(tiny_run, photos, tmp_path):
    from captioning import Captioner
    out = tmp_path / "preds.jsonl"
    job = torchrun(2, "--checkpoint", tiny_run / "best.pt", "--out", out, "--batch-size", "2", photos)
    stdout, stderr = job.communicate(timeout=240)
    assert job.returncode == 0, stderr
    inputs = expand_inputs([photos])
    got = rows(out)
    assert [r["input"] for r in got] == inputs and all(r["model"].startswith("best.pt@") for r in got)
    assert [r["caption"] for r in got] == reference(Captioner.from_checkpoint(tiny_run / "best.pt"), inputs)
    assert not (tmp_path / "preds.jsonl.parts").exists() and "11 input(s)" in stderr


def test_an_export_s_ranks_caption_lists_and_shards_without_torch_and_a_failing_rank_is_named(
        tiny_run, shapes_dir, photos, tmp_path):
    from captioning import Captioner
    from captioning.data.shards import iter_samples, write_shards
    from captioning.decode.export import export
    from conftest import tiny_config
    export(tiny_run / "best.pt", tmp_path / "export")
    write_shards(tiny_config(shapes_dir, tmp_path / "run"), tmp_path / "shards", shard_size=6, progress=False)
    (tmp_path / "inputs.txt").write_text(f"# the photos\n{photos}\n")
    inputs = [f"@{tmp_path / 'inputs.txt'}", str(tmp_path / "shards" / "train-00000{0..2}.tar")]
    poison = tmp_path / "poison" / "torch"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('a rank captioning from an export imported torch')\n")
    env = {"PYTHONPATH": str(poison.parent)}
    out = tmp_path / "preds.jsonl"
    (rank0, _, err0), (rank1, _, err1) = by_hand(2, "--model", tmp_path / "export", "--out", out, *inputs, env=env)
    assert (rank0, rank1) == (0, 0), err0 + err1
    shards = [str(tmp_path / "shards" / f"train-00000{i}.tar") for i in range(3)]
    samples = [(f"{shard}#{key}", data) for shard in shards for key, data, _, _ in iter_samples(shard)]
    files = expand_inputs([photos])
    assert [r["input"] for r in rows(out)] == files + [name for name, _ in samples] and len(samples) == 18
    onnx = Captioner.from_export(tmp_path / "export")
    assert [r["caption"] for r in rows(out)] == reference(onnx, files + [data for _, data in samples])

    # a rank that cannot write its part: it says so, and rank 0 ends the job naming it
    broken = tmp_path / "broken.jsonl"
    (tmp_path / "broken.jsonl.parts" / "rank-1-of-2.jsonl").mkdir(parents=True)
    (rank0, _, err0), (rank1, _, err1) = by_hand(2, "--model", tmp_path / "export", "--out", broken, photos, env=env)
    assert rank1 != 0 and "error: rank 1 of 2:" in err1
    assert rank0 != 0 and "rank 1 of 2 failed" in err0 and "run the same command again" in err0


class SlowImages(SimpleHTTPRequestHandler):
    """Each image takes a while to arrive, so that a rank can be killed halfway through its part."""
    def do_GET(self):
        time.sleep(0.15)
        super().do_GET()

    def log_message(self, *args):
        pass


def test_a_rank_killed_mid_run_is_named_and_a_rerun_gives_every_input_exactly_once(tiny_run, photos, tmp_path):
    from captioning import Captioner
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SlowImages, directory=str(photos)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    files = expand_inputs([photos])
    urls = [f"http://127.0.0.1:{server.server_port}/{Path(f).name}" for f in files]
    out = tmp_path / "preds.jsonl"
    args = ("--checkpoint", tiny_run / "best.pt", "--out", out, "--batch-size", "1", *urls)
    try:
        job = torchrun(2, *args)
        part, alive = out.with_name("preds.jsonl.parts") / "rank-1-of-2.jsonl", \
            out.with_name("preds.jsonl.parts") / "rank-1-of-2.alive"
        deadline = time.monotonic() + 180
        while not (part.is_file() and part.read_text().count("\n") >= 2) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(int(alive.read_text().split()[0]), signal.SIGKILL)
        _, stderr = job.communicate(timeout=120)
        assert job.returncode != 0 and "rank      : 1" in stderr and "SIGKILL" in stderr
        assert not out.exists() and 2 <= part.read_text().count("\n") < len(urls) // 2
        # again, as one process (any number of processes goes on from the parts)
        again = subprocess.run([sys.executable, "-m", "captioning", "caption", *map(str, args)], cwd=ROOT,
                               capture_output=True, text=True, timeout=240)
    finally:
        server.shutdown()
    assert again.returncode == 0, again.stderr
    got = rows(out)
    assert [r["input"] for r in got] == urls                # each input exactly once, in input order
    assert [r["caption"] for r in got] == reference(Captioner.from_checkpoint(tiny_run / "best.pt"), files)
    assert not out.with_name("preds.jsonl.parts").exists()


def test_rank_0_ignores_an_earlier_job_s_failed_mark_but_names_this_job_s(tmp_path):
    """A rerun after a failure: rank 1 removes its old .failed mark when it starts, maybe after rank 0 looked."""
    from captioning.cli import spread
    from captioning.cli.spread import Rank, RankFailed, mark_done, running, wait_for_ranks

    out, rank0, rank1 = tmp_path / "preds.jsonl", Rank(0, 2), Rank(1, 2)
    spread.parts_folder(out).mkdir()
    stale = spread._mark(out, 1, 2, "failed")
    stale.write_text(json.dumps({"error": "the earlier job's error"}))
    os.utime(stale, (time.time() - 3600,) * 2)

    def rank_1():
        time.sleep(0.5)
        with running(out, rank1):
            mark_done(out, rank1, "job", rows=1)

    thread = threading.Thread(target=rank_1)
    thread.start()
    wait_for_ranks(out, rank0, "job", grace_s=30)          # returns: the stale mark was not taken for this job's
    thread.join()
    spread._mark(out, 1, 2, "done").unlink()
    spread._mark(out, 1, 2, "failed").write_text(json.dumps({"error": "this job's error"}))
    with pytest.raises(RankFailed, match="rank 1 of 2 failed: this job's error"):
        wait_for_ranks(out, rank0, "job", grace_s=30)
