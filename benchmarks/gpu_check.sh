#!/usr/bin/env bash
# The CUDA paths the CPU test suite cannot reach, run once on a GPU machine, each figure printed beside
# the same run's fp32 one:
#
#   setup       GPU, env.json, a generated Shapes set, backbone weights (below)
#   train       one epoch of the reference-size model (configs/flickr30k.yaml: ResNet-152 frozen at
#               224 px, d_model 512, 6+6 layers) per precision: fp32, bf16, fp16 (GradScaler)
#   cache       train.cache_features=true: the cache built by the training run, then its epoch from it
#   resume      SIGKILL a run right after its first (mid-epoch) checkpoint, `train --resume` it, and
#               compare its last.pt with an uninterrupted run's (bit-exact expected in fp32 only)
#   caption     `python -m captioning caption` at fp32, bf16, fp16: ms/image, captions equal to fp32's
#   ddp         torchrun over every GPU (skipped on one GPU; two CPU processes in the dry run)
#   benchmarks  benchmarks/decode.py and benchmarks/train.py, short form, on the GPU
#
# Backbone weights: the GPU machine has no network, and ResNet-152's random weights make features of
# ~4e8 (each residual stage adds to the last), past fp16's 65504: fp16 training stops on a NaN loss and
# the fp16 feature cache refuses them. So setup does what benchmarks/train.py does -- BatchNorm
# statistics calibrated on one batch of the Shapes images -- and saves those random weights where
# torchvision looks for its ImageNet file, in a private TORCH_HOME; the runs then say
# model.pretrained=true and load them from there, never from the network. Speed does not depend on
# the weights' values; the captions of a model trained an epoch say little.
#
# Run it:
#   bash benchmarks/gpu_check.sh --prepare       # here, once: .whl/site/pycocoevalcap (its Python files,
#                                                # ~0.2 MB; the GPU machine's image lacks that package)
#   bash benchmarks/gpu_check.sh                 # on the GPU machine: device tool run(command=
#                                                # "bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same sections on the CPU at tiny sizes (GPU_CHECK_DRY_RUN=1)
#
# Everything goes to stdout and to ${OUT:-/tmp/gpu_check}/gpu_check.log (with env.json beside it).
# A failed section prints `FAILED: name` and the others still run; the last line is
#   gpu_check: sections=N failed=M skipped=K seconds=S failed_names=... key=value ...
# Exit status: 0 when every section ran and passed. Knobs (environment): GPU_CHECK_SECTIONS (which
# sections, with their budgets in seconds: "setup:90 resume:180" reruns the resume check alone; setup
# always first, since the others need its data and weights), GPU_CHECK_IMAGES (Shapes images, default
# 4000; 80 dry), GPU_CHECK_DEADLINE_S (all sections, default 420 s), GPU_CHECK_WORKERS (data loader
# workers, default 8), GPU_CHECK_WORK (scratch folder, default a new /tmp/gpu_check_work.*, removed
# at the end unless GPU_CHECK_KEEP=1), PYTHON (default python3, or this repo's .venv/bin/python).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/benchmarks/gpu_check.sh"

usage() { sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; }

ARGS=("$@") SECTION=""
while (($#)); do
    case "$1" in
        --cpu-dry-run) export GPU_CHECK_DRY_RUN=1 ;;
        --prepare) MODE=prepare ;;
        --section) SECTION=$2; shift ;;          # internal: one section, run by the main script under timeout
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON

# ---------------------------------------------------------------- --prepare (here, with the venv)

if [[ ${MODE:-} == prepare ]]; then
    src=$("$PYTHON" -c "import pycocoevalcap; print(list(pycocoevalcap.__path__)[0])") || {
        echo "gpu_check --prepare: $PYTHON has no pycocoevalcap: run 'make install' first" >&2; exit 2; }
    dest=$REPO/.whl/site/pycocoevalcap              # .whl/ is git-ignored; the device tool carries it on request
    rm -rf "$dest" && mkdir -p "$dest"
    # the Python scorers only: the jars (METEOR, SPICE, the PTB tokenizer, ~100 MB) need Java, which the check never runs
    (cd "$src" && find . -name '*.py' -o -name '*.txt' -o -name 'LICENSE*' | grep -v __pycache__ |
        while read -r f; do mkdir -p "$dest/$(dirname "$f")" && cp "$f" "$dest/$f"; done)
    echo "wrote $dest ($(du -sh "$dest" | cut -f1)); carry .whl with the device tool"
    exit 0
fi

# ---------------------------------------------------------------- settings

DRY=${GPU_CHECK_DRY_RUN:-0}
export GPU_CHECK_DRY_RUN=$DRY PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}
LOG_DIR=${OUT:-/tmp/gpu_check}
if [[ $DRY == 1 ]]; then
    DEVICE=cpu IMAGES=${GPU_CHECK_IMAGES:-80} IMAGE_SIZE=64 BATCH=8 WORKERS=${GPU_CHECK_WORKERS:-0}
    DEADLINE=${GPU_CHECK_DEADLINE_S:-900} BACKBONE=resnet18 CAPTION_IMAGES=4
    # the reference model's structure at toy widths; one thread, to share this machine politely
    MODEL_SETS=(model.backbone=resnet18 model.d_model=32 model.num_heads=4 model.num_encoder_layers=1
                model.num_decoder_layers=1 model.dim_feedforward=64)
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
else
    DEVICE=cuda IMAGES=${GPU_CHECK_IMAGES:-4000} IMAGE_SIZE=224 BATCH=32 WORKERS=${GPU_CHECK_WORKERS:-8}
    DEADLINE=${GPU_CHECK_DEADLINE_S:-420} BACKBONE=resnet152 CAPTION_IMAGES=16
    MODEL_SETS=()
fi
PRECISIONS="fp32 bf16 fp16"          # fp32 first: every other figure is printed beside it
RESUME_PRECISIONS="fp32 fp16"        # fp16: the GradScaler's state goes through last.pt too
export DEVICE IMAGES IMAGE_SIZE BATCH WORKERS BACKBONE CAPTION_IMAGES PRECISIONS RESUME_PRECISIONS LOG_DIR

# ---------------------------------------------------------------- helpers (sections run in child processes)

note() { printf '%s\n' "$*"; }
figure() { printf '%s=%s\n' "$1" "$2" >>"$WORK/figures.kv"; }       # a key figure for the summary line
get_figure() { sed -n "s/^$1=//p" "$WORK/figures.kv" 2>/dev/null | tail -1; }
cuda_only() {                                                        # true (and says so) when $1 needs CUDA here
    if [[ $DRY == 1 && $1 == fp16 ]]; then note "skip $2 fp16: CUDA only (--cpu-dry-run)"; return 0; fi
    return 1
}
now() { date +%s.%N; }
# a command's output for the log: tqdm's progress bars (redrawn in place with \r) left out, the rest line by line
show() { awk -v RS='[\r\n]' 'NF && !/[0-9]+%\|/ { print; fflush() }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "n/a" }'; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# the reference config on the Shapes set: `train_cmd RUN_NAME PRECISION [--set ...]` puts the command that
# trains one run into the array CMD (run as "${CMD[@]}": in the background, $! is then python itself)
common_sets() {
    local s sets=(data.format=shapes "data.images=$DATA/flickr30k_images" "data.captions=$DATA/results.csv"
                  "data.image_size=$IMAGE_SIZE" model.pretrained=true train.epochs=1 "train.device=$DEVICE"
                  "train.num_workers=$WORKERS" "train.batch_size=$BATCH" "${MODEL_SETS[@]}")
    for s in "${sets[@]}"; do printf -- '--set\0%s\0' "$s"; done
}
train_cmd() {
    local name=$1 precision=$2; shift 2
    local args; mapfile -d '' args < <(common_sets)
    mkdir -p "$WORK/runs"
    CMD=("$PYTHON" -m captioning train --config "$REPO/configs/flickr30k.yaml" "${args[@]}"
         --set "run_dir=$WORK/runs/$name" --set "train.precision=$precision" "$@")
}
train_run() {                  # one run, its output shown and kept in runs/NAME.log
    train_cmd "$@"
    "${CMD[@]}" 2>&1 | tee "$WORK/runs/$1.log" | show
}
running() {                    # pid $1 runs (a zombie, dead but not yet waited for, does not)
    local stat; stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }; [[ ${stat%% *} != Z ]]
}
# "seconds images_per_s n_train train_loss val_loss" of a run's last epoch (seconds: train + val loss)
run_stats() {
    "$PYTHON" - "$1" <<'EOF'
import csv, json, sys
from pathlib import Path
run = Path(sys.argv[1])
row = list(csv.DictReader(open(run / "history.csv")))[-1]
n = len(json.loads((run / "splits.json").read_text())["train"])
s = float(row["seconds"])
print(f"{s:.2f} {n / s:.1f} {n} {row['train_loss']} {row['val_loss']}")
EOF
}

# ---------------------------------------------------------------- sections

section_setup() {
    if [[ $DRY == 1 ]]; then note "skip nvidia-smi: --cpu-dry-run"
    else nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || note "(nvidia-smi failed)"; fi
    "$PYTHON" - "$LOG_DIR/env.json" "$DEVICE" "$WORK/figures.kv" <<'EOF'
import json, sys
from captioning.env import write_env
env = write_env(sys.argv[1], sys.argv[2], "fp32,bf16,fp16")
print(json.dumps(env, indent=1))
with open(sys.argv[3], "a") as f:
    f.write(f"gpu={(env['gpu'] or 'none').replace(' ', '_')} torch={env['torch']} commit={(env['git_commit'] or 'none')[:12]}\n")
EOF
    local t0; t0=$(now)
    "$PYTHON" -m captioning shapes "$DATA" --images "$IMAGES" 2>&1 | show
    note "Shapes: $IMAGES images in $(elapsed "$t0" "$(now)") s at $DATA"
    figure shapes_images "$IMAGES"

    # random backbone weights with calibrated BatchNorm, saved as torchvision's ImageNet file (see the header)
    "$PYTHON" - "$BACKBONE" "$IMAGE_SIZE" "$DATA/flickr30k_images" "$DEVICE" <<'EOF'
import sys
from pathlib import Path
import torch, torchvision
from captioning.data import build_transform
from captioning.images import open_image
backbone, size, images, device = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
weights = torchvision.models.get_model_weights(backbone).DEFAULT
dest = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
torch.manual_seed(0)
net = torchvision.models.get_model(backbone, weights=None, num_classes=len(weights.meta["categories"])).to(device)
transform = build_transform(size)
x = torch.stack([transform(open_image(p)) for p in sorted(images.iterdir())[:32]]).to(device)
body = torch.nn.Sequential(*list(net.children())[:-2])            # up to layer4, as the Encoder keeps it
with torch.no_grad():
    raw = body.eval()(x).abs().max().item()
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 1.0
    body.train()(x)                                               # each BatchNorm takes this batch's statistics
    for m in norms:
        m.momentum = 0.1
    calibrated = body.eval()(x).abs().max().item()
dest.parent.mkdir(parents=True, exist_ok=True)
torch.save(net.cpu().state_dict(), dest)
print(f"{backbone}: random weights give features up to {raw:.3g}, BatchNorm calibrated {calibrated:.3g} "
      f"(fp16 max 65504); saved as {dest}")
EOF
}

section_train() {
    local p s ips n tl vl s32="" ips32=""
    for p in $PRECISIONS; do
        cuda_only "$p" train && continue
        note "--- train $p: one epoch"
        train_run "train_$p" "$p"
        read -r s ips n tl vl < <(run_stats "$WORK/runs/train_$p")
        figure "train_${p}_s" "$s"; figure "train_${p}_ips" "$ips"
        [[ $p == fp32 ]] && { s32=$s; ips32=$ips; }
        printf -v "row_$p" '%-5s %9s s/epoch %9s img/s  x%-5s  train loss %s  val loss %s  (%s train images)' \
            "$p" "$s" "$ips" "$(ratio "$ips" "$ips32")" "$tl" "$vl" "$n"
    done
    note "train, one epoch (train + val loss), beside fp32:"
    for p in $PRECISIONS; do v="row_$p"; [[ -n ${!v:-} ]] && note "  ${!v}"; done
    [[ -f $WORK/runs/train_fp32/env.json ]] && note "env.json of train_fp32: $(tr -d '\n ' <"$WORK/runs/train_fp32/env.json")"
    return 0
}

section_cache() {
    local p s ips n tl vl build ips_build prec ips32="" build32="" plain
    for p in $PRECISIONS; do
        cuda_only "$p" cache && continue
        note "--- cache $p: the training run builds the cache, then trains an epoch from it"
        train_run "cache_$p" "$p" --set train.cache_features=true --set "data.features_dir=$WORK/features_$p"
        read -r s ips n tl vl < <(run_stats "$WORK/runs/cache_$p")
        # the extraction's pace from its own files: meta.json is written after the first batch, progress.json
        # after the last, so (rows after the first batch) / (time between them) leaves out the warm-up
        read -r build ips_build prec < <("$PYTHON" - "$WORK/features_$p" <<'EOF'
import json, sys
from pathlib import Path
folder = next(Path(sys.argv[1]).glob("*/meta.json")).parent
meta = json.loads((folder / "meta.json").read_text())
n, first = meta["shape"][0], min(64, meta["shape"][0])          # extract_features' default batch of 64
dt = (folder / "progress.json").stat().st_mtime - (folder / "meta.json").stat().st_mtime
rate = (n - first) / dt if n > first and dt > 0 else 0
print(f"{n / rate:.2f}" if rate else "n/a", f"{rate:.1f}" if rate else "n/a", meta.get("precision", "?"))
EOF
)
        figure "cache_${p}_build_ips" "$ips_build"; figure "cache_${p}_epoch_s" "$s"
        [[ $p == fp32 ]] && { ips32=$ips; build32=$ips_build; }
        plain=$(get_figure "train_${p}_s")
        printf -v "row_$p" '%-5s build %8s img/s x%-5s (%s s for all)  epoch %7s s  %8s img/s x%-5s  (%s s without the cache)' \
            "$p" "$ips_build" "$(ratio "$ips_build" "$build32")" "$build" "$s" "$ips" "$(ratio "$ips" "$ips32")" "${plain:-?}"
    done
    note "feature cache (extraction in the cache's precision; epoch from the cache), beside fp32:"
    for p in $PRECISIONS; do v="row_$p"; [[ -n ${!v:-} ]] && note "  ${!v}"; done
    return 0
}

section_resume() {
    local p steps save_every run pid alive state result exact diff status=0
    steps=$(( (IMAGES * 9 / 10 + BATCH - 1) / BATCH ))           # about the steps of one epoch
    save_every=$(( steps / 3 > 2 ? steps / 3 : 2 ))              # checkpoints at 1/3 and 2/3 of the epoch
    for p in $RESUME_PRECISIONS; do
        cuda_only "$p" resume && continue
        note "--- resume $p: an uninterrupted run, then one killed after its first checkpoint (every $save_every steps) and resumed"
        train_run "resume_full_$p" "$p" --set "train.save_every=$save_every"
        run=$WORK/runs/resume_killed_$p
        train_cmd "resume_killed_$p" "$p" --set "train.save_every=$save_every"
        "${CMD[@]}" >"$run.log" 2>&1 &
        pid=$!
        while running "$pid" && [[ ! -e $run/last.pt ]]; do sleep 0.05; done
        alive=0
        if running "$pid"; then kill -9 "$pid"; alive=1; fi
        wait "$pid" || true
        show <"$run.log"
        state=$("$PYTHON" -c "import sys, torch; c = torch.load(sys.argv[1], map_location='cpu', weights_only=True, mmap=True); \
print(f\"epoch {c['epoch']} batch {c['batch']} step {c['step']}\")" "$run/last.pt")
        if [[ $alive == 1 ]]; then note "SIGKILL after the first checkpoint: last.pt at $state"
        else note "the run ended before the kill (last.pt at $state): nothing to resume"; status=1; fi
        note "--- train --resume $run"
        "$PYTHON" -m captioning train --resume "$run" 2>&1 | tee "$run.resume.log" | show
        result=$("$PYTHON" - "$WORK/runs/resume_full_$p/last.pt" "$run/last.pt" <<'EOF'
import sys, torch
a, b = (torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in sys.argv[1:3])
exact = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
diff = max(((a["model"][k].double() - b["model"][k].double()).abs().max().item()
            for k in a["model"] if a["model"][k].is_floating_point() and a["model"][k].numel()), default=0.0)
same_history = [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
print(str(exact).lower(), f"{diff:.3g}", a["step"], b["step"], str(same_history).lower())
EOF
)
        read -r exact diff sa sb hist <<<"$result"
        note "resume $p: bit-exact=$exact max_abs_diff=$diff steps $sa/$sb same train_loss history=$hist"
        figure "resume_${p}_bitexact" "$exact"; figure "resume_${p}_maxdiff" "$diff"
        [[ $sa == "$sb" ]] || { note "resume $p: the runs ended at different steps"; status=1; }
        if [[ $p == fp32 && $exact != true ]]; then
            note "NOTE: fp32 resume is not bit-exact here (the CPU test asserts it is): nondeterministic CUDA kernels?"
        fi
    done
    return $status
}

section_caption() {
    local ckpt="" c p images ms32="" status=0
    for c in "$WORK"/runs/{train,resume_full}_fp32/{best,last}.pt; do          # best.pt: the model alone, quicker to load
        [[ -f $c ]] && { ckpt=$c; break; }
    done
    [[ -n $ckpt ]] || { note "no fp32 checkpoint to caption with (the train section failed?)"; return 1; }
    mapfile -t images < <(ls "$DATA/flickr30k_images" | sort | head -n "$CAPTION_IMAGES" | sed "s|^|$DATA/flickr30k_images/|")
    local run_precisions=""
    for p in $PRECISIONS; do
        cuda_only "$p" caption && continue
        run_precisions+="$p "
        "$PYTHON" -m captioning caption --checkpoint "$ckpt" --device "$DEVICE" --precision "$p" --json \
            "${images[@]}" >"$WORK/caption_$p.jsonl"
        note "caption $p (the CLI): $(head -n 2 "$WORK/caption_$p.jsonl" | tr '\n' ' ')..."
    done
    # the timing: Captioner.caption as the CLI calls it, after a warm-up, median of 3; captions against fp32's
    "$PYTHON" - "$ckpt" "$DEVICE" "$WORK" "$run_precisions" "${images[@]}" <<'EOF' >"$WORK/caption.table"
import json, statistics, sys, time
import torch
from captioning import Captioner
ckpt, device, work, precisions, images = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(), sys.argv[5:]
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

def median_s(fn):
    fn(); sync()
    times = []
    for _ in range(3):
        start = time.perf_counter(); fn(); sync(); times.append(time.perf_counter() - start)
    return statistics.median(times)

cli = {p: [json.loads(line)["caption"] for line in open(f"{work}/caption_{p}.jsonl")] for p in precisions}
base = None
for p in precisions:
    c = Captioner.from_checkpoint(ckpt, device=device, precision=p)
    batch = median_s(lambda: c.caption(images, batch_size=len(images))) / len(images) * 1e3
    one = median_s(lambda: c.caption(images[:1])) * 1e3
    base = base or (batch, one)
    agree = sum(a == b for a, b in zip(cli[p], cli[precisions[0]]))
    print(f"FIGURE caption_{p}_ms={batch:.2f} caption_{p}_one_ms={one:.1f} caption_{p}_agree={agree}/{len(images)}")
    print(f"  {p:5s} {batch:8.2f} ms/image (batch {len(images)}) x{base[0] / batch:.2f}   {one:8.1f} ms one image "
          f"x{base[1] / one:.2f}   captions equal to {precisions[0]}'s: {agree}/{len(images)}")
EOF
    grep -v '^FIGURE ' "$WORK/caption.table"
    sed -n 's/^FIGURE //p' "$WORK/caption.table" | tr ' ' '\n' | while IFS='=' read -r k v; do figure "$k" "$v"; done
    note "distinct fp32 captions: $(sed 's/.*"caption": //' "$WORK/caption_fp32.jsonl" | sort -u | wc -l) of ${#images[@]} (a model trained one epoch)"
    return $status
}

section_ddp() {
    local n precision=bf16 s ips tl vl m
    if [[ $DRY == 1 ]]; then
        n=2 precision=fp32
        note "--cpu-dry-run: two CPU processes (gloo) instead of one per GPU"
    else
        n=$(nvidia-smi -L | wc -l) || n=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
        if (( n < 2 )); then note "skip ddp: $n GPU (torchrun needs several)"; figure ddp skipped; return 0; fi
    fi
    note "--- ddp: torchrun --nproc_per_node=$n, $precision, global batch $((BATCH * n)) ($BATCH per process)"
    train_cmd ddp "$precision" --set "train.batch_size=$((BATCH * n))"
    # the same command, with torchrun's launcher in front of `-m captioning train`
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$n" "${CMD[@]:1}" 2>&1 | tee "$WORK/runs/ddp.log" | show
    read -r s ips m tl vl < <(run_stats "$WORK/runs/ddp")
    local one; one=$(get_figure "train_${precision}_ips")
    note "ddp x$n $precision: $s s/epoch $ips img/s, x$(ratio "$ips" "$one") one process's $precision (${one:-?} img/s)"
    figure ddp_gpus "$n"; figure ddp_ips "$ips"
}

section_benchmarks() {
    local b args src line status=0
    for b in decode train; do
        src=$REPO/benchmarks/$b.py                     # the flags it takes, read from its argparse lines
        args=()
        grep -q -- '"--device"' "$src" && args+=(--device "$DEVICE")
        grep -q -- '"--repeats"' "$src" && args+=(--repeats 1)
        if [[ $b == train ]] && grep -q -- '"--images"' "$src"; then args+=(--images "$([[ $DRY == 1 ]] && echo 4 || echo 32)"); fi
        if [[ $DRY == 1 && $b == decode ]]; then
            note "skip benchmarks/decode.py: its reference re-runs ResNet-152 per word, minutes on this CPU (would run: ${args[*]})"
            continue
        fi
        note "--- benchmarks/$b.py ${args[*]}"
        "$PYTHON" "$REPO/benchmarks/$b.py" "${args[@]}" 2>&1 | tee "$WORK/bench_$b.log" | show || { status=1; continue; }
        line=$(grep "^$b: " "$WORK/bench_$b.log" | tail -1) || true
        # its last line's key=value pairs, prefixed: decode_speedup_vs_reference=...
        for kv in ${line#*: }; do [[ $kv == *=* ]] && figure "bench_${b}_${kv%%=*}" "${kv#*=}"; done
    done
    return $status
}

# ---------------------------------------------------------------- one section (a child, under timeout)

if [[ -n $SECTION ]]; then
    DATA=$WORK/shapes
    "section_$SECTION"
    exit $?
fi

# ---------------------------------------------------------------- main: tee into the log, then the sections

if [[ -z ${GPU_CHECK_TEED:-} ]]; then
    mkdir -p "$LOG_DIR"
    GPU_CHECK_TEED=1 bash "$SELF" "${ARGS[@]}" 2>&1 | tee "$LOG_DIR/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi

START=$SECONDS
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check_work.XXXXXX)}
mkdir -p "$WORK" && : >"$WORK/figures.kv"
export WORK TORCH_HOME=$WORK/torch_home           # the calibrated backbone weights live here, nowhere else
cleanup() { [[ ${GPU_CHECK_KEEP:-0} == 1 ]] || rm -rf "$WORK"; }
trap cleanup EXIT

note "gpu_check: $([[ $DRY == 1 ]] && echo 'CPU dry run' || echo GPU) at $(date -u +%FT%TZ), repo $REPO, python $PYTHON"
note "work $WORK, log $LOG_DIR/gpu_check.log, $IMAGES images at ${IMAGE_SIZE}px, batch $BATCH, $WORKERS workers, deadline ${DEADLINE}s"

summary() {   # the last line: counts, then the key figures
    local figs; figs=$(tr '\n' ' ' <"$WORK/figures.kv" 2>/dev/null || true)
    note "gpu_check: sections=$1 failed=${#FAILED[@]} skipped=${#SKIPPED[@]} seconds=$((SECONDS - START))" \
         "dry_run=$DRY failed_names=$(IFS=,; echo "${FAILED[*]:-none}") ${figs% }"
}
FAILED=() SKIPPED=()

# Python, its packages and this repo, checked in this process: every section inherits what is set here
python_ready() {
    local missing
    if [[ -d $REPO/.whl/site ]]; then export PYTHONPATH=$REPO/.whl/site${PYTHONPATH:+:$PYTHONPATH}; fi
    missing=$("$PYTHON" - <<'EOF'
import importlib.util
need = ["torch", "torchvision", "numpy", "pandas", "PIL", "matplotlib", "yaml", "tqdm", "requests", "urllib3",
        "pycocoevalcap"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
) || { note "gpu_check: $PYTHON does not run"; return 1; }
    if [[ -n $missing ]]; then
        note "gpu_check: $PYTHON lacks $missing, and this machine may have no network: stopping." \
             "(pycocoevalcap: run 'bash benchmarks/gpu_check.sh --prepare' where it is installed, and carry .whl)"
        return 1
    fi
    if "$PYTHON" -c "import captioning, os, sys; sys.exit(not os.path.realpath(captioning.__file__).startswith(sys.argv[1]))" \
        "$REPO/src/" 2>/dev/null; then
        note "captioning: already importable from $REPO/src"
    elif "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO"; then
        note "captioning: pip install -e $REPO (offline, no dependencies)"
    else
        export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
        note "captioning: pip install -e failed; using PYTHONPATH=$REPO/src"
    fi
    "$PYTHON" -c "import captioning.train" || { note "gpu_check: 'import captioning.train' fails"; return 1; }
    if [[ $DRY != 1 ]] && ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        note "gpu_check: torch sees no CUDA device here (for the CPU plumbing: --cpu-dry-run)"; return 1
    fi
    "$PYTHON" -c "import torch, torchvision, platform; print('python', platform.python_version(), 'torch', torch.__version__, \
'torchvision', torchvision.__version__, 'threads', torch.get_num_threads(), 'cuda', torch.version.cuda)"
}
if ! python_ready; then
    FAILED=(python); summary 0; exit 2
fi

# name:budget in seconds; each is cut to what is left of the deadline
if [[ $DRY == 1 ]]; then
    SECTIONS=${GPU_CHECK_SECTIONS:-"setup:120 train:180 cache:180 resume:300 caption:150 ddp:180 benchmarks:300"}
else
    SECTIONS=${GPU_CHECK_SECTIONS:-"setup:90 train:150 cache:120 resume:180 caption:90 ddp:120 benchmarks:120"}
fi
n=0
for item in $SECTIONS; do
    name=${item%%:*} budget=${item#*:} n=$((n + 1))
    left=$((DEADLINE - (SECONDS - START)))
    if [[ " ${FAILED[*]:-} " == *" setup "* ]]; then
        note "SKIPPED: $name (setup failed)"; SKIPPED+=("$name"); continue
    fi
    if ((left < 20)); then
        note "SKIPPED: $name (${left}s left of the ${DEADLINE}s deadline)"; SKIPPED+=("$name"); continue
    fi
    ((budget > left)) && budget=$left
    note ""; note "=== $name (budget ${budget}s) ==="
    t0=$SECONDS
    if timeout --kill-after=15 "$budget" bash "$SELF" --section "$name"; then
        note "=== $name: ok in $((SECONDS - t0))s"
    else
        rc=$?
        note "FAILED: $name (exit $rc$( ((rc == 124 || rc == 137)) && echo ", out of its ${budget}s")) after $((SECONDS - t0))s"
        FAILED+=("$name")
    fi
done
summary "$n"
((${#FAILED[@]} == 0 && ${#SKIPPED[@]} == 0))
