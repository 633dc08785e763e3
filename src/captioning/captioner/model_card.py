"""The model card of a model folder (README.md): YAML front matter the Hugging Face Hub indexes,
then the prose a reader needs before using the model.

`gather(checkpoint, cfg, report)` reads the run directory beside the checkpoint (env.json,
history.csv, splits.json and an `evaluate` report); `model_card(name, meta, facts)` writes the text
from those facts and config.json's dict. Nothing here imports torch.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import yaml

log = logging.getLogger(__name__)
# evaluate's metric -> the hub's metric id (model-index `type`) and the name shown
METRIC_IDS = {"BLEU-1": ("bleu", "BLEU-1"), "BLEU-2": ("bleu", "BLEU-2"),
              "BLEU-3": ("bleu", "BLEU-3"), "BLEU-4": ("bleu", "BLEU-4"),
              "METEOR": ("meteor", "METEOR"), "ROUGE-L": ("rouge", "ROUGE-L"),
              "CIDEr": ("cider", "CIDEr-D"),
              "shapes_accuracy": ("accuracy", "Shapes exact-match accuracy")}
LICENSE_NOTE = ("# not chosen: set it (mit, apache-2.0, cc-by-4.0, other, ...) before publishing; "
                "the training data's terms apply to the weights too")
RUN_FILES = ("config.json", "env.json", "splits.json", "cider_df.json")


# ---------------------------------------------------------------- facts from the run directory

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _is_report(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("metrics"), dict) \
        and isinstance(obj.get("predictions"), list)


def find_report(checkpoint: Path, report: str | Path | None = None) -> tuple[Path, dict] | None:
    """The `evaluate --out` report of this checkpoint: `report`, else the newest one in its folder
    written after it (an older one scored an earlier best.pt)."""
    if report is not None:
        path = Path(report).expanduser()
        obj = _read_json(path) if path.is_file() else None
        if not _is_report(obj):
            raise ValueError(f"--report {path}: not a report that evaluate --out wrote")
        return path, obj
    found = [(path.stat().st_mtime, path) for path in sorted(checkpoint.parent.glob("*.json"))
             if path.name not in RUN_FILES]
    fresh = [(t, p) for t, p in found if t >= checkpoint.stat().st_mtime]
    reports = [(t, p, obj) for t, p in fresh if _is_report(obj := _read_json(p))]
    stale = [p for t, p in found if t < checkpoint.stat().st_mtime and _is_report(_read_json(p))]
    if stale:
        log.warning("%s: left out, older than %s (an earlier model's scores): %s",
                    checkpoint.parent, checkpoint.name, ", ".join(p.name for p in stale))
    return max(reports, key=lambda r: r[0])[1:] if reports else None


def _split_of(report: dict, splits: dict | None) -> str | None:
    """The split of the run whose images the report captioned (None: not one of them)."""
    images = {p.get("image") for p in report["predictions"]}
    for name, names in (splits or {}).items():
        if images and images <= set(names):
            return name
    return None


def _history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def gather(checkpoint: Path, report: str | Path | None = None) -> dict:
    """What the card says about the run: env.json, history.csv, the split sizes and the report."""
    run_dir = checkpoint.parent
    splits = _read_json(run_dir / "splits.json")
    splits = splits if isinstance(splits, dict) else None
    history = _history(run_dir / "history.csv")
    found = find_report(checkpoint, report)
    facts = {"checkpoint": checkpoint.name, "env": _read_json(run_dir / "env.json"),
             "epochs_trained": len(history) or None,
             "split_sizes": {k: len(v) for k, v in splits.items()} if splits else None}
    seconds = [float(h["seconds"]) for h in history if h.get("seconds")]
    facts["seconds_per_epoch"] = round(sum(seconds) / len(seconds), 1) if seconds else None
    if found is not None:
        path, obj = found
        facts["report"] = {"file": path.name, "metrics": obj["metrics"],
                           "split": _split_of(obj, splits), "notes": obj.get("notes", [])}
    return facts


# ---------------------------------------------------------------- the card

def dataset_name(meta: dict) -> tuple[str, str, str]:
    """(a short id for the front matter, a name, words for the prose) of the run's data set."""
    data = meta["run"]["data"]
    fmt, stem = data.get("format", "auto"), Path(str(data.get("captions", ""))).stem.lower()
    if fmt == "shapes":
        return "shapes-synthetic", "Shapes (synthetic)", (
            "the synthetic Shapes data set (`python -m captioning shapes`: coloured circles, "
            "squares and triangles on plain backgrounds)")
    if fmt == "flickr30k" or (fmt == "auto" and stem == "results"):
        return "flickr30k", "Flickr30k", "Flickr30k (the Kaggle copy: results.csv)"
    if fmt == "karpathy":
        name = "coco" if "coco" in stem else "flickr8k" if "8k" in stem else "flickr30k"
        return (f"{name}-karpathy", f"{name} (Karpathy's split)",
                f"{name} in Karpathy's split ({stem}.json)")
    if fmt == "coco":
        return "coco", "COCO", "COCO captions (the official annotation files)"
    return stem or "own-data", stem or "own data", f"the user's own captions ({fmt} file {stem})"


def front_matter(name: str, meta: dict, facts: dict) -> str:
    """The YAML header: pipeline_tag, library_name, tags, datasets, metrics, license (left to the
    user, with a comment), and model-index with the report's scores when there is one."""
    data_id, data_name, _ = dataset_name(meta)
    m = meta["model"]
    tags = ["image-captioning", "image-to-text", "resnet", "transformer", "safetensors",
            f"d_model-{m['d_model']}", data_id] + (["onnx"] if meta.get("onnx") else [])
    head = {"pipeline_tag": "image-to-text", "library_name": "captioning", "tags": tags,
            "datasets": [data_id]}
    report = facts.get("report")
    scores = [(k, v) for k, v in (report or {}).get("metrics", {}).items()
              if k in METRIC_IDS and isinstance(v, (int, float))]
    rest = {}
    if scores:
        head["metrics"] = sorted({METRIC_IDS[k][0] for k, _ in scores})
        dataset = {"name": data_name, "type": data_id}
        if report["split"]:
            dataset["split"] = report["split"]
        rest["model-index"] = [{"name": name, "results": [{
            "task": {"type": "image-to-text", "name": "Image captioning"}, "dataset": dataset,
            "metrics": [{"type": METRIC_IDS[k][0], "name": METRIC_IDS[k][1],
                         "value": round(float(v), 4)} for k, v in scores]}]}]
    text = yaml.safe_dump(head, sort_keys=False) + f"license: unknown  {LICENSE_NOTE}\n"
    return "---\n" + text + (yaml.safe_dump(rest, sort_keys=False) if rest else "") + "---\n"


def _architecture(meta: dict, params: str) -> str:
    m, r = meta["model"], meta["run"]
    weights = {(True, True): "ImageNet weights, fine-tuned",
               (True, False): "ImageNet weights, frozen",
               (False, True): "trained from scratch", (False, False): "random weights, frozen"}
    backbone = (f"a torchvision {m['backbone']} ({m['backbone_stages']} of 4 stages, "
                f"{weights[bool(m['pretrained']), bool(m['train_backbone'])]})")
    objective = ("cross-entropy (teacher forcing)" if r["train"]["objective"] == "xe" else
                 f"self-critical sequence training (CIDEr-D reward, {r['scst']['samples']} samples "
                 f"an image, {r['scst']['baseline']} baseline), starting from "
                 f"{Path(str(r['train']['init_from'])).name or 'a trained model'}")
    size = meta["preprocessing"]["image_size"]
    return (f"An image captioner: {backbone} turns a {size} px image into a grid of features, "
            f"projected to d_model {m['d_model']} and read by "
            f"`torch.nn.Transformer` ({m['num_encoder_layers']} encoder + "
            f"{m['num_decoder_layers']} decoder layers, {m['num_heads']} heads, feed-forward "
            f"{m['dim_feedforward']}), which writes English captions word by word from a "
            f"vocabulary of {meta['vocab_size']} tokens, at most "
            f"{meta['decoding']['max_words']} words{params}. Trained with {objective}.")


def _training(meta: dict, facts: dict) -> str:
    r, source = meta["run"], meta.get("source", {})
    data_words = dataset_name(meta)[2]
    sizes = facts.get("split_sizes")
    split = (f": {sizes.get('train', 0)} training, {sizes.get('val', 0)} validation and "
             f"{sizes.get('test', 0)} test images, split by image" if sizes else "")
    epochs = facts.get("epochs_trained")
    best = source.get("epoch")
    val = [f"validation loss {source['val_loss']:.4f}" if source.get("val_loss") is not None
           else "", f"validation CIDEr-D {source['val_cider']:.3f}"
           if source.get("val_cider") is not None else ""]
    lines = [f"Trained on {data_words}{split}, "
             + (f"for {epochs} epochs; " if epochs else "")
             + (f"these are the weights of epoch {best} ({', '.join(v for v in val if v)}), "
                f"the best by train.monitor={r['train']['monitor']}." if best else
                "the weights of its checkpoint."),
             f"Batch {r['train']['batch_size']} images, {r['train']['optimizer']} at lr "
             f"{r['train']['lr']:g} ({r['train']['scheduler']} schedule), "
             f"precision {r['train']['precision']}, seed {r['seed']}. The whole config is in "
             "config.json (`run` and `model`)."]
    env = facts.get("env")
    if env:
        cpu = (env.get("cpu_flags") or {}).get("model", "a CPU")
        device = env.get("gpu") or cpu
        per_epoch = facts.get("seconds_per_epoch")
        lines.append(f"Machine (the run's env.json): {device} ({env.get('device')}), "
                     f"{env.get('threads')} threads, torch {env.get('torch')}, precision "
                     f"{env.get('precision')}"
                     + (f"; {per_epoch:g} s an epoch on average." if per_epoch else "."))
    return "\n\n".join(lines)


def _scores(facts: dict) -> str:
    report = facts.get("report")
    if not report:
        return ("No `evaluate` report was found beside the checkpoint, so no test scores are "
                "given. Score it with `python -m captioning evaluate --checkpoint RUN/best.pt "
                "--out RUN/test_predictions.json`, then `save` again.")
    metrics = report["metrics"]
    rows = [f"| {METRIC_IDS[k][1]} | {v:.4f} |" for k, v in metrics.items()
            if k in METRIC_IDS and isinstance(v, (int, float))]
    split = report["split"] or "(a set of images that is not one of the run's splits)"
    notes = "".join(f"\n\nNote from evaluate: {n}" for n in report.get("notes", []))
    return (f"On the {split} split of the run ({metrics.get('images', '?')} images, none of them "
            "seen in training), from `python -m captioning evaluate` "
            f"({report['file']} beside the checkpoint): coco-caption's metrics over the whole "
            "split at once, each caption scored against all of its image's reference captions "
            "(METEOR needs Java; Shapes accuracy: the share of captions that state the image's "
            "ground truth). The report does not record its decoding options; evaluate's "
            "default is greedy.\n\n| metric | score |\n|---|---|\n" + "\n".join(rows) + notes)


def _usage(name: str, meta: dict) -> str:
    onnx = meta.get("onnx") or {}
    text = ("```python\nfrom captioning import Captioner\n\n"
            f'captioner = Captioner.from_pretrained("models/{name}")   # or its hub id user/name\n'
            'captioner("photo.jpg")                 # -> the caption\n'
            'captioner.caption(["a.jpg", "https://example.com/b.png"], beam_size=3)\n```\n\n'
            f"From the command line: `python -m captioning caption --model models/{name} "
            f"photo.jpg`, or behind HTTP: `python -m captioning serve --model models/{name}`.")
    if onnx:
        text += (f"\n\n{' and '.join(onnx)} ONNX exports are in onnx/: "
                 f"`python -m captioning caption --model models/{name}/{next(iter(onnx.values()))} "
                 "photo.jpg` captions on ONNX Runtime without torch (pip install -e '.[export]').")
    return text


def _limits(meta: dict, facts: dict) -> str:
    data_id = dataset_name(meta)[0]
    shapes = data_id == "shapes-synthetic" or "shapes_accuracy" in (
        (facts.get("report") or {}).get("metrics") or {})
    first = ("It was trained on synthetic Shapes images only and captions Shapes images only: a "
             "photograph gets a sentence about coloured shapes, whatever it shows. It is a demo "
             "of the pipeline, not a general captioner." if shapes else
             "It describes images like those it was trained on; far from them (drawings, "
             "screenshots, text, medical images) its captions are unreliable.")
    return (f"- {first}\n- It only writes words of its vocabulary ({meta['vocab_size']} tokens), "
            "in English, and repeats the content and the biases of its training captions.\n"
            f"- Images are resized to {meta['preprocessing']['image_size']} px squares (no crop): "
            "small details and the aspect ratio are lost.")


def model_card(name: str, meta: dict, facts: dict) -> str:
    """README.md of a model folder named `name`, from config.json's dict and `gather`'s facts."""
    params = f", {facts['parameters'] / 1e6:.1f} M parameters" if facts.get("parameters") else ""
    sections = [("", _architecture(meta, params)), ("Training", _training(meta, facts)),
                ("Scores", _scores(facts)), ("How to use it", _usage(name, meta)),
                ("Limits", _limits(meta, facts)),
                ("License", "Not chosen: the `license` field above says `unknown`. Pick one "
                            "before publishing; the terms of the training data (images and "
                            "captions) apply to a model trained on them."),
                ("Files", "`model.safetensors` (weights, no optimizer state, nothing that runs "
                          "code), `config.json` (model, preprocessing, decoding defaults, the "
                          "run's config), `vocab.json` (the tokens in id order)"
                          + (", `onnx/` (ONNX exports)" if meta.get("onnx") else "") + ".")]
    body = "\n\n".join(f"## {title}\n\n{text}" if title else text for title, text in sections)
    return f"{front_matter(name, meta, facts)}\n# {name}\n\n{body}\n"
