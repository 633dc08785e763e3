"""Captioning across processes: 2 processes x 1 thread (torchrun) against 1 process x 2 threads, from
an export (ONNX Runtime) and from a checkpoint (PyTorch), side by side in one run.

Each side is the real command, timed from start to end (imports, model loading and the merge
included, as a user meets them): `python -m torch.distributed.run --nproc_per_node=2 -m captioning
caption --out FILE` against `python -m captioning caption --out FILE` with 2 intra-op threads
(ONNX Runtime's default of one a core; torch.set_num_threads(2) through OMP_NUM_THREADS). A folder
of generated 500x375 JPEGs (noise, so the codec does real work). Random weights (speed does not
depend on them), captions forced to `--words` words (<eos> pinned to -inf) so every side decodes
the same number of steps. `--model shapes` (default): configs/shapes.yaml's small model at 224 px;
`--model reference`: ResNet-152 + the 6+6-layer d_model 512 transformer (slow: use few images).
Every round runs the four commands in turn, each on a fresh --out file.

Last line: caption_processes: images=N export_2x1_img_s=... export_1x2_img_s=...
export_2x1_ratio=... checkpoint_2x1_img_s=... checkpoint_1x2_img_s=... checkpoint_2x1_ratio=...
(a ratio: the 2 processes' images/s over the better of the two sides of that model form)

    python benchmarks/caption_processes.py [--images 400] [--model shapes|reference] [--rounds 2] [--json PATH]
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import common
from caption_folder import build, make_folder
from captioning.decode.export import export_model
from captioning.model.checkpoint import model_checkpoint, save_atomic

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(processes: int, model_flag: list[str], out: Path, folder: Path, batch_size: int) -> None:
    """One captioning job, start to end; fails loudly if it did not caption every image."""
    caption = ["-m", "captioning", "caption", *model_flag, "--out", str(out), "--batch-size", str(batch_size),
               str(folder)]
    if processes > 1:
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                f"--master_port={free_port()}", *caption]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    else:
        argv, env = [sys.executable, *caption], {**os.environ, "OMP_NUM_THREADS": "2"}
    out.unlink(missing_ok=True)
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    if not rows or any("caption" not in row for row in rows):
        raise SystemExit(f"{out}: not every image got a caption")


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--model", choices=["reference", "shapes"], default="shapes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--words", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    env = common.machine("cpu", "fp32")
    model, vocab, cfg = build(args.model, args.words)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "photos"
        make_folder(folder, args.images)
        save_atomic(model_checkpoint(model, cfg, vocab), tmp / "best.pt")
        export_model(model.float().eval(), vocab, cfg, tmp / "export", None, tmp / "best.pt")
        flags = {"export": ["--model", str(tmp / "export")],
                 "checkpoint": ["--checkpoint", str(tmp / "best.pt"), "--engine", "torch"]}
        jobs = {f"{form}_{shape}": (lambda n=n, flag=flag, o=tmp / f"{form}_{shape}.jsonl":
                                    command(n, flag, o, folder, args.batch_size))
                for form, flag in flags.items() for shape, n in (("2x1", 2), ("1x2", 1))}
        seconds = common.medians(jobs, args.rounds, warmup=1, progress=True)
    figures = {"images": args.images, "model": args.model}
    for form in flags:
        rate = {shape: args.images / seconds[f"{form}_{shape}"] for shape in ("2x1", "1x2")}
        figures |= {f"{form}_2x1_img_s": f"{rate['2x1']:.2f}", f"{form}_1x2_img_s": f"{rate['1x2']:.2f}",
                    f"{form}_2x1_ratio": f"{rate['2x1'] / max(rate.values()):.2f}",
                    f"{form}_1x2_ratio": f"{rate['1x2'] / max(rate.values()):.2f}"}
    figures["machine"] = common.label(env)
    common.finish("caption_processes", figures, env, args.json)


if __name__ == "__main__":
    main()
