"""The GPU check's sections, each a function run in a process of its own by benchmarks/gpu_check.py (which says
how to run the check), and its sizes: the reference's on a GPU, toy ones with --cpu-dry-run.

  setup       nvidia-smi, env.json, a generated Shapes set, and random backbone weights with BatchNorm calibrated
              on one batch (raw, ResNet-152's features pass fp16's 65504) saved as torchvision's ImageNet file
              in a private TORCH_HOME, which the runs load as model.pretrained=true: no network needed
  train       an epoch of configs/flickr30k.yaml's model (ResNet-152 frozen at 224 px, 6+6 layers) at fp32, bf16
              and fp16 (GradScaler)
  cache       train.cache_features=true: the run builds the feature cache, then trains its epoch from it
  resume      SIGKILL a run after its first mid-epoch checkpoint, `train --resume` it, and compare its last.pt
              with an uninterrupted run's (fp32 and fp16; bit-exact expected in fp32 only)
  caption     `captioning caption` at each precision: ms/image, and captions equal to fp32's
  ddp         torchrun over every GPU (skipped on one; two CPU processes in the dry run)
  benchmarks  benchmarks/decode.py and benchmarks/train.py, short form

`python benchmarks/gpu_sections.py NAME` runs one, in GPU_CHECK_WORK (where setup left its data and weights).
"""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common

REPO, PY = Path(__file__).resolve().parents[1], sys.executable
DRY = os.environ.get("GPU_CHECK_DRY_RUN") == "1" or "--cpu-dry-run" in sys.argv


def knob(name: str, gpu, dry):                   # GPU_CHECK_<name>, else the GPU's or the dry run's default
    return type(gpu)(os.environ.get(f"GPU_CHECK_{name}", dry if DRY else gpu))


IMAGES, WORKERS, DEADLINE = knob("IMAGES", 4000, 80), knob("WORKERS", 8, 0), knob("DEADLINE_S", 420, 900)
BUDGETS = knob("SECTIONS", "setup:90 train:150 cache:120 resume:180 caption:90 ddp:120 benchmarks:120",
               "setup:120 train:180 cache:180 resume:300 caption:150 ddp:180 benchmarks:300")  # name:seconds
DEVICE, SIZE, BATCH, BACKBONE, SHOWN = ("cpu", 64, 8, "resnet18", 4) if DRY else ("cuda", 224, 32, "resnet152", 16)
TOY = "backbone=resnet18 d_model=32 num_heads=4 num_encoder_layers=1 num_decoder_layers=1 dim_feedforward=64"  # dry
LOG = Path(os.environ.get("OUT", "/tmp/gpu_check"))                          # gpu_check.log, env.json
WORK = Path(os.environ.setdefault("GPU_CHECK_WORK", f"/tmp/gpu_check_work.{os.getpid()}"))
DATA, RUNS, FIGURES = WORK / "shapes", WORK / "runs", WORK / "figures.json"
os.environ.update(GPU_CHECK_DRY_RUN=str(int(DRY)), TORCH_HOME=str(WORK / "torch_home"),  # setup's weights go here
                  PYTHONUNBUFFERED="1", TQDM_MININTERVAL=os.environ.get("TQDM_MININTERVAL", "30"))
if DRY:                                                                      # one thread, to share the CPU
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run(*cmd, log: Path | None = None, check: bool = True) -> int:
    """cmd's output shown line by line (tqdm's redrawn bars left out) and kept whole in `log`; its exit status."""
    with subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc, \
            open(log or os.devnull, "w") as kept:
        for line in proc.stdout:
            kept.write(line)
            if line.strip() and "%|" not in line:
                print(line, end="", flush=True)
    if check and proc.returncode:
        sys.exit(f"exit {proc.returncode}: {' '.join(map(str, cmd))}")
    return proc.returncode


def figure(**values) -> None:                    # key figures for the last line, kept across the sections' processes
    FIGURES.write_text(json.dumps(figures() | {k: str(v) for k, v in values.items()}))


def figures() -> dict:
    return json.loads(FIGURES.read_text()) if FIGURES.exists() else {}


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def precisions(section: str, names=("fp32", "bf16", "fp16")) -> list[str]:   # fp32 first: the rest beside it
    if DRY and "fp16" in names:
        print(f"skip {section} fp16: CUDA only (--cpu-dry-run)")
    return [p for p in names if not (DRY and p == "fp16")]


def train_cmd(name: str, precision: str, *sets: str) -> list:
    """`captioning train` of run NAME: configs/flickr30k.yaml on the Shapes set for one epoch, `sets` last."""
    RUNS.mkdir(parents=True, exist_ok=True)
    sets = (*f"data.format=shapes data.images={DATA}/flickr30k_images data.captions={DATA}/results.csv "
            f"data.image_size={SIZE} model.pretrained=true train.epochs=1 train.device={DEVICE} "
            f"train.num_workers={WORKERS} train.batch_size={BATCH} run_dir={RUNS / name} "
            f"train.precision={precision}".split(), *(f"model.{s}" for s in TOY.split() if DRY), *sets)
    return ["-m", "captioning", "train", "--config", REPO / "configs/flickr30k.yaml",
            *(arg for s in sets for arg in ("--set", s))]


def train_run(name: str, precision: str, *sets: str, launcher=()) -> tuple:
    """Run NAME trained (its output in runs/NAME.log); seconds, images/s, images, losses of its epoch."""
    run(PY, *launcher, *train_cmd(name, precision, *sets), log=RUNS / f"{name}.log")
    row = list(csv.DictReader(open(RUNS / name / "history.csv")))[-1]          # seconds: train + val loss
    n, s = len(json.loads((RUNS / name / "splits.json").read_text())["train"]), float(row["seconds"])
    return s, n / s, n, row["train_loss"], row["val_loss"]


def setup():
    if DRY:
        print("skip nvidia-smi: --cpu-dry-run")
    else:
        run("nvidia-smi", "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader", check=False)
    import torch
    import torchvision

    from captioning.data.dataset import build_transform
    from captioning.data.images import open_image
    from captioning.env import write_env
    from train import calibrate_batchnorm

    env = write_env(LOG / "env.json", DEVICE, "fp32,bf16,fp16")
    print(json.dumps(env, indent=1))
    figure(gpu=(env["gpu"] or "none").replace(" ", "_"), torch=env["torch"], commit=(env["git_commit"] or "none")[:12])
    start = time.time()
    run(PY, "-m", "captioning", "shapes", DATA, "--images", IMAGES)
    print(f"Shapes: {IMAGES} images in {time.time() - start:.1f} s at {DATA}")
    figure(shapes_images=IMAGES)
    weights = torchvision.models.get_model_weights(BACKBONE).DEFAULT         # its file name, where torch looks
    dest = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    torch.manual_seed(0)
    net = torchvision.models.get_model(BACKBONE, num_classes=len(weights.meta["categories"])).to(DEVICE)
    body = torch.nn.Sequential(*list(net.children())[:-2])            # up to layer4, as the Encoder keeps it
    x = torch.stack([build_transform(SIZE)(open_image(p)) for p in sorted((DATA / "flickr30k_images").iterdir())[:32]])
    with torch.no_grad():
        raw = body.eval()(x := x.to(DEVICE)).abs().max().item()
        calibrate_batchnorm(body, x)
        calibrated = body(x).abs().max().item()
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.cpu().state_dict(), dest)
    print(f"{BACKBONE}: random weights give features up to {raw:.3g}, BatchNorm calibrated {calibrated:.3g} "
          f"(fp16 max 65504); saved as {dest}")


def train():
    base = None
    for p in precisions("train"):
        print(f"--- train {p}: one epoch")
        s, ips, n, tl, vl = train_run(f"train_{p}", p)
        base = base or ips
        figure(**{f"train_{p}_s": f"{s:.2f}", f"train_{p}_ips": f"{ips:.1f}"})
        print(f"train {p:5s} {s:9.2f} s/epoch {ips:9.1f} img/s  x{ratio(ips, base)} fp32's  train loss {tl}  "
              f"val loss {vl}  ({n} train images; seconds: train + val loss)")
    if (env := RUNS / "train_fp32" / "env.json").is_file():
        print(f"env.json of train_fp32: {json.dumps(json.loads(env.read_text()))}")


def cache():
    base = None
    for p in precisions("cache"):
        print(f"--- cache {p}: the training run builds the cache, then trains an epoch from it")
        s, ips, *_ = train_run(f"cache_{p}", p, "train.cache_features=true", f"data.features_dir={WORK}/features_{p}")
        # the extraction's pace from its own files: meta.json is written after the first batch (extract_features'
        # 64), progress.json after the last, so (rows after the first batch) / (time between them) has no warm-up
        folder = next((WORK / f"features_{p}").glob("*/meta.json")).parent
        n = json.loads((folder / "meta.json").read_text())["shape"][0]
        dt = (folder / "progress.json").stat().st_mtime - (folder / "meta.json").stat().st_mtime
        build = (n - 64) / dt if n > 64 and dt > 0 else 0
        base = base or (build, ips)
        figure(**{f"cache_{p}_build_ips": f"{build:.1f}", f"cache_{p}_epoch_s": f"{s:.2f}"})
        print(f"cache {p:5s} build {build:8.1f} img/s x{ratio(build, base[0])} ({ratio(n, build)} s for all)  epoch "
              f"{s:7.2f} s {ips:8.1f} img/s x{ratio(ips, base[1])}  "
              f"({figures().get(f'train_{p}_s', '?')} s without the cache)")


def resume():
    every, status = max((IMAGES * 9 // 10 + BATCH - 1) // BATCH // 3, 2), 0   # checkpoints at 1/3 and 2/3 of an epoch
    import torch

    def load(name):
        return torch.load(RUNS / name / "last.pt", map_location="cpu", weights_only=True, mmap=True)
    for p in precisions("resume", ("fp32", "fp16")):                      # fp16: the GradScaler's state goes too
        print(f"--- resume {p}: an uninterrupted run, then one killed after its first checkpoint (every {every} "
              "steps) and resumed")
        train_run(f"resume_full_{p}", p, f"train.save_every={every}")
        killed = RUNS / f"resume_killed_{p}"
        with open(f"{killed}.log", "w") as log:
            proc = subprocess.Popen([PY, *train_cmd(killed.name, p, f"train.save_every={every}")], stdout=log,
                                    stderr=subprocess.STDOUT)
            while proc.poll() is None and not (killed / "last.pt").exists():
                time.sleep(0.05)
            alive = proc.poll() is None
            proc.kill()
            proc.wait()
        run("cat", f"{killed}.log")
        c = load(killed.name)
        at = f"last.pt at epoch {c['epoch']} batch {c['batch']} step {c['step']}"
        print(f"SIGKILL after the first checkpoint: {at}" if alive else f"the run ended before the kill ({at}): "
              "nothing to resume")
        status |= not alive
        print(f"--- train --resume {killed}")
        run(PY, "-m", "captioning", "train", "--resume", killed, log=f"{killed}.resume.log")
        a, b = load(f"resume_full_{p}"), load(killed.name)
        exact = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        diff = max(((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"]
                    if a["model"][k].is_floating_point() and a["model"][k].numel()), default=0.0)
        same = [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
        print(f"resume {p}: bit-exact={exact} max_abs_diff={diff:.3g} steps {a['step']}/{b['step']} "
              f"same train_loss history={same}")
        figure(**{f"resume_{p}_bitexact": str(exact).lower(), f"resume_{p}_maxdiff": f"{diff:.3g}"})
        if a["step"] != b["step"]:
            print(f"resume {p}: the runs ended at different steps")
            status = 1
        if p == "fp32" and not exact:
            print("NOTE: fp32 resume is not bit-exact here (the CPU test asserts it is): nondeterministic CUDA "
                  "kernels?")
    return status


def caption():
    import torch

    from captioning import Captioner
    ckpt = next((c for c in (RUNS / f"{r}_fp32" / f"{kind}.pt" for r in ("train", "resume_full")
                             for kind in ("best", "last")) if c.is_file()), None)   # best.pt: the model alone
    if ckpt is None:
        sys.exit("no fp32 checkpoint to caption with (the train section failed?)")
    images = [str(p) for p in sorted((DATA / "flickr30k_images").iterdir())[:SHOWN]]
    cli, base = {}, None
    for p in precisions("caption"):
        out = subprocess.run([PY, "-m", "captioning", "caption", "--checkpoint", ckpt, "--device", DEVICE,
                              "--precision", p, "--json", *images], stdout=subprocess.PIPE, text=True,
                             check=True).stdout
        cli[p] = [json.loads(line)["caption"] for line in out.splitlines()]
        print(f"caption {p} (the CLI): {' '.join(out.splitlines()[:2])}...")
    for p in cli:          # Captioner.caption as the CLI calls it, medians of 3 after a warm-up, beside fp32's
        c = Captioner.from_checkpoint(ckpt, device=DEVICE, precision=p)
        t = common.medians({"batch": lambda: c.caption(images, batch_size=len(images)),
                            "one": lambda: c.caption(images[:1])}, 3,
                           sync=torch.cuda.synchronize if DEVICE == "cuda" else None)
        batch, one, agree = t["batch"] / len(images) * 1e3, t["one"] * 1e3, sum(map(str.__eq__, cli[p], cli["fp32"]))
        base = base or (batch, one)
        figure(**{f"caption_{p}_ms": f"{batch:.2f}", f"caption_{p}_one_ms": f"{one:.1f}",
                  f"caption_{p}_agree": f"{agree}/{len(images)}"})
        print(f"  {p:5s} {batch:8.2f} ms/image (batch {len(images)}) x{ratio(base[0], batch)}   {one:8.1f} ms one "
              f"image x{ratio(base[1], one)}   captions equal to fp32's: {agree}/{len(images)}")
    print(f"distinct fp32 captions: {len(set(cli['fp32']))} of {len(images)} (a model trained one epoch)")


def ddp():
    import torch
    n, precision = (2, "fp32") if DRY else (torch.cuda.device_count(), "bf16")
    if DRY:
        print("--cpu-dry-run: two CPU processes (gloo) instead of one per GPU")
    elif n < 2:
        print(f"skip ddp: {n} GPU (torchrun needs several)")
        figure(ddp="skipped")
        return
    print(f"--- ddp: torchrun --nproc_per_node={n}, {precision}, global batch {BATCH * n} ({BATCH} per process)")
    s, ips, *_ = train_run("ddp", precision, f"train.batch_size={BATCH * n}",
                       launcher=("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"))
    one = float(figures().get(f"train_{precision}_ips", 0))
    print(f"ddp x{n} {precision}: {s:.2f} s/epoch {ips:.1f} img/s, x{ratio(ips, one)} one process's {precision} "
          f"({one or '?'} img/s)")
    figure(ddp_gpus=n, ddp_ips=f"{ips:.1f}")


def benchmarks():
    status = 0
    for name, extra in (("decode", ()), ("train", ("--images", 4 if DRY else 32, "--extract-images", 0))):
        args = ("--device", DEVICE, "--repeats", 1, *extra, "--json", WORK / f"bench_{name}.json")
        if DRY and name == "decode":
            print("skip benchmarks/decode.py: its reference re-runs ResNet-152 per word, minutes on this CPU")
            continue
        print(f"--- benchmarks/{name}.py {' '.join(map(str, args))}")
        if run(PY, REPO / "benchmarks" / f"{name}.py", *args, log=WORK / f"bench_{name}.log", check=False):
            status = 1
            continue
        result = json.loads((WORK / f"bench_{name}.json").read_text())["figures"]
        figure(**{f"bench_{name}_{k}": v for k, v in result.items()})          # bench_decode_speedup_vs_reference=...
    return status


SECTIONS = {f.__name__: f for f in (setup, train, cache, resume, caption, ddp, benchmarks)}

if __name__ == "__main__":
    sys.exit(SECTIONS[sys.argv[1]]() or 0)
