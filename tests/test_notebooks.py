"""The notebooks, run headless with papermill on tiny settings; each test checks what the notebook made.

The first tests only read the committed notebooks' JSON (fast); the others execute them (slow)."""
import functools
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml

from captioning.config import save_config
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("training.ipynb", "inference.ipynb", "extra_research/dmodel_study.ipynb", "extra_research/scst.ipynb")
INJECTED = "injected-parameters"     # papermill's tag for the cell it inserts after the parameters cell


def execute(notebook: str, out: Path, **parameters):
    """Run a notebook from the repo root with its parameters cell overridden; returns the executed notebook."""
    papermill = pytest.importorskip("papermill")
    return papermill.execute_notebook(str(ROOT / notebook), str(out), parameters=parameters, cwd=str(ROOT),
                                      kernel_name="python3", progress_bar=False)


def text_outputs(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def has_image(cell) -> bool:
    return any("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def tracked_notebooks() -> list[str]:
    """Every notebook git tracks (top level and extra_research/ today), as paths from the repo root."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", "*.ipynb"], cwd=ROOT, capture_output=True,
                                check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):   # not a git checkout (an sdist, an export)
        listed = []
    names = [n for n in listed if n and (ROOT / n).is_file()]
    return names or sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("**/*.ipynb")
                           if not {".venv", "runs", ".ipynb_checkpoints"} & set(p.parts))


def tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags") or []


def parameters(notebook: str) -> dict:
    """The values the parameters cell of a committed notebook sets."""
    cell = next(c for c in json.loads((ROOT / notebook).read_text())["cells"] if "parameters" in tags(c))
    values = {}
    exec("".join(cell["source"]), {}, values)
    return values


def test_no_committed_notebook_carries_papermill_injected_parameters():
    # that cell runs after the parameters cell and silently replaces what a Jupyter reader typed there
    notebooks = tracked_notebooks()
    assert set(NOTEBOOKS) <= set(notebooks)
    for notebook in notebooks:
        cells = json.loads((ROOT / notebook).read_text(encoding="utf-8"))["cells"]
        injected = [i for i, c in enumerate(cells) if INJECTED in tags(c)]
        assert not injected, (f"{notebook}: cell(s) {injected} tagged {INJECTED!r} (papermill's); remove them "
                              f"with: python scripts/strip_injected.py {notebook}")


def test_parameters_cells_default_to_what_a_jupyter_reader_has_after_make_demo():
    training = parameters("training.ipynb")
    assert training["config"] == "configs/shapes.yaml" and (ROOT / training["config"]).is_file()
    inference = parameters("inference.ipynb")
    assert inference["checkpoint"] == "runs/shapes/best.pt"                # what `make demo` trains
    assert inference["images"] and all(i.startswith("data/shapes/flickr30k_images/") for i in inference["images"])
    study = parameters("extra_research/dmodel_study.ipynb")
    assert (ROOT / "extra_research" / study["study"]).is_file()             # from Jupyter's working folder
    assert study["out_dir"] is None                                         # beside the study file


def test_papermill_reads_every_parameter_so_that_p_name_value_is_typed_and_logged_without_a_warning(caplog):
    """papermill's parameter reader skips (with "Unable to parse line") a line with a second `=`, in a comment too."""
    papermill = pytest.importorskip("papermill")
    for notebook in NOTEBOOKS:
        with caplog.at_level("WARNING", logger="papermill"):
            names = {p["name"] for p in papermill.inspect_notebook(str(ROOT / notebook)).values()}
        assert names == set(parameters(notebook)), notebook
        assert not [r for r in caplog.records if "Unable to parse" in r.getMessage()], notebook


def test_strip_injected_removes_only_papermill_cells_and_writes_nbformat_layout(tmp_path):
    def cell(source, tag=None, count=None):
        return {"cell_type": "code", "execution_count": count, "id": f"c{count}", "metadata": {"tags": [tag] if tag
                else []}, "outputs": [{"name": "stdout", "output_type": "stream", "text": ["é\n"]}], "source": [source]}
    notebook = {"cells": [cell("x = 1", "parameters", 1), cell("x = 2", INJECTED, 2), cell("print(x)", None, 3)],
                "metadata": {"papermill": {"parameters": {"x": 2}}}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "in.ipynb").write_text(json.dumps(notebook))
    script = str(ROOT / "scripts" / "strip_injected.py")
    subprocess.run([sys.executable, script, str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb")], check=True)
    out = json.loads((tmp_path / "out.ipynb").read_text(encoding="utf-8"))
    assert [c["source"] for c in out["cells"]] == [["x = 1"], ["print(x)"]]
    assert [c["execution_count"] for c in out["cells"]] == [1, 3]          # counts and outputs kept as they were
    assert out["cells"][1]["outputs"] == notebook["cells"][2]["outputs"]
    nbformat = pytest.importorskip("nbformat")
    written = (tmp_path / "out.ipynb").read_text(encoding="utf-8")
    assert written == nbformat.writes(nbformat.from_dict(out)) + "\n"      # nbformat's own layout
    subprocess.run([sys.executable, script, str(tmp_path / "out.ipynb")], check=True)   # in place, idempotent
    assert (tmp_path / "out.ipynb").read_text(encoding="utf-8") == written


@pytest.mark.slow
def test_committed_notebooks_have_a_tagged_parameters_cell_and_outputs_of_a_real_run():
    for notebook in NOTEBOOKS:
        cells = json.loads((ROOT / notebook).read_text())["cells"]
        tagged = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
        assert len(tagged) == 1, f"{notebook}: expected one cell tagged 'parameters'"
        assert "real run" in "".join(cells[0]["source"]), f"{notebook}: the first cell says where its outputs come from"
        code = [c for c in cells if c["cell_type"] == "code"]
        assert all(c.get("execution_count") for c in code), f"{notebook}: committed without running every cell"
        assert not any(o.get("output_type") == "error" for c in code for o in c["outputs"]), notebook


@pytest.mark.slow
def test_training_notebook_trains_evaluates_and_shows(shapes_dir, tmp_path):
    cfg = tiny_config(shapes_dir, tmp_path / "run")
    save_config(cfg, tmp_path / "tiny.yaml")
    scst = tiny_config(shapes_dir, tmp_path / "scst", "train.objective=scst", "train.monitor=cider", "train.epochs=1",
                       "scst.samples=3", "scst.max_words=8", f"train.init_from={tiny_run_checkpoint(tmp_path)}")
    save_config(scst, tmp_path / "scst.yaml")
    nb = execute("training.ipynb", tmp_path / "training.ipynb", config=str(tmp_path / "tiny.yaml"),
                 overrides=["train.epochs=2"], examples=3, figures_dir=str(tmp_path / "figures"),
                 scst_config=str(tmp_path / "scst.yaml"))
    run = tmp_path / "run"
    for name in ("best.pt", "last.pt", "history.csv", "loss.png", "lr.png", "test_predictions.json"):
        assert (run / name).is_file(), name
    assert len(pd.read_csv(run / "history.csv")) == 2                     # the override reached fit()
    report = json.loads((run / "test_predictions.json").read_text())
    assert {"BLEU-4", "CIDEr", "ROUGE-L", "METEOR", "shapes_accuracy"} <= set(report["metrics"])
    assert set(report["references"]) == {p["image"] for p in report["predictions"]}
    for name in ("data_examples.png", "test_predictions.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000, name
    shown = "".join(text_outputs(c) for c in nb.cells)
    assert "CIDEr" in shown and "BLEU-4" in shown                           # the metrics table is displayed
    assert sum(has_image(c) for c in nb.cells) >= 4                         # data, history, predictions, reward
    assert "missing images" in shown                                        # the data check's report
    # the SCST phase started from the notebook's own best.pt (the config's init_from is replaced) and was scored
    assert (tmp_path / "scst" / "test_predictions.json").is_file() and "+ SCST" in shown


@pytest.mark.slow
def test_training_notebook_on_a_config_without_an_scst_config_trains_scores_and_skips_scst(shapes_dir, tmp_path):
    # the README's case: a config of the user's own photos (Flickr30k's layout, not format shapes), the notebook's
    # default scst_config ("auto"): nothing beside my_photos.yaml, so no SCST phase -- and no failure at the end
    cfg = tiny_config(shapes_dir, tmp_path / "run", "data.format=flickr30k")
    save_config(cfg, tmp_path / "my_photos.yaml")
    nb = execute("training.ipynb", tmp_path / "training.ipynb", config=str(tmp_path / "my_photos.yaml"),
                 overrides=["train.epochs=1"], examples=2, figures_dir=str(tmp_path / "figures"))
    assert (tmp_path / "run" / "test_predictions.json").is_file()
    shown = "".join(text_outputs(c) for c in nb.cells)
    assert "no SCST phase (my_photos.yaml has no my_photos_scst.yaml beside it)" in shown and "+ SCST" not in shown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "my_photos.yaml", "run", "training.ipynb"]


def tiny_run_checkpoint(tmp_path):
    """A file for train.init_from to name when the config is written (the notebook replaces it with its own)."""
    path = tmp_path / "placeholder.pt"
    path.touch()
    return path


@pytest.fixture
def image_server(shapes_dir):
    """The Shapes images over http on 127.0.0.1 (no test touches the internet)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shapes_dir / "flickr30k_images"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def batch_cell(nb):
    return next(c for c in nb.cells if c.cell_type == "code" and "results = captioner.caption(images" in c.source)


@pytest.mark.slow
def test_inference_notebook_captions_paths_and_urls_and_reports_bad_inputs(tiny_run, shapes_dir, image_server,
                                                                          tmp_path):
    names = sorted(p.name for p in (shapes_dir / "flickr30k_images").iterdir())[:2]
    images = [str(shapes_dir / "flickr30k_images" / names[0]), f"{image_server}/{names[1]}",
              str(tmp_path / "missing.jpg")]
    nb = execute("inference.ipynb", tmp_path / "inference.ipynb", checkpoint=str(tiny_run / "best.pt"),
                 images=images, beam_size=2)
    batch = text_outputs(batch_cell(nb))                                   # the batch's table, one row per input
    for source in images:
        assert source in batch
    assert "missing.jpg" in batch and "error" in batch
    one_by_one = next(c for c in nb.cells if c.cell_type == "code" and "for source in images" in c.source)
    assert sum(has_image({"outputs": [o]}) for o in one_by_one.outputs) == 2   # the two good images, drawn
    assert "missing.jpg" in text_outputs(one_by_one)
    n_best = next(c for c in nb.cells if c.cell_type == "code" and "num_captions=3" in c.source)
    assert "beam" in text_outputs(n_best) and "sampled" in text_outputs(n_best)
    maps = next(c for c in nb.cells if c.cell_type == "code" and "show_attention" in c.source)
    assert sum(has_image({"outputs": [o]}) for o in maps.outputs) == 2          # a grid of maps per good image


@pytest.mark.slow
def test_inference_notebook_takes_held_out_test_images_when_images_is_empty(tiny_run, tmp_path):
    nb = execute("inference.ipynb", tmp_path / "inference.ipynb", checkpoint=str(tiny_run / "best.pt"), images=[],
                 examples=2)
    test_names = json.loads((tiny_run / "splits.json").read_text())["test"][:2]
    batch = text_outputs(batch_cell(nb))
    assert all(name in batch for name in test_names)
    assert "error" not in batch


@pytest.mark.slow
def test_study_notebook_runs_every_seed_and_shows_the_table_the_summary_and_the_curves(shapes_dir, tmp_path):
    folder = tmp_path / "study"          # the study's paths are relative to it; the notebook runs from the repo root
    folder.mkdir()
    save_config(tiny_config(shapes_dir, "unused", "train.epochs=1"), folder / "base.yaml")
    study = {"base": "base.yaml", "run_root": "../runs", "seeds": [0, 1],
             "set": {"data.images": "../shapes/flickr30k_images", "data.captions": "../shapes/results.csv"},
             "variants": {"d16": {"model.d_model": 16, "model.num_heads": 2},
                          "d32": {"model.d_model": 32, "model.num_heads": 4}}}
    (tmp_path / "shapes").symlink_to(shapes_dir, target_is_directory=True)
    (folder / "study.yaml").write_text(yaml.safe_dump(study))
    nb = execute("extra_research/dmodel_study.ipynb", tmp_path / "study.ipynb", study=str(folder / "study.yaml"))
    table = pd.read_csv(folder / "study" / "results.csv")        # out_dir None: beside the study file, by its name
    assert list(zip(table["variant"], table["seed"])) == [("d16", 0), ("d16", 1), ("d32", 0), ("d32", 1)]
    assert list(table["d_model"]) == [16, 16, 32, 32]
    for variant, seed in zip(table["variant"], table["seed"]):
        saved = yaml.safe_load((tmp_path / "runs" / variant / f"seed{seed}" / "config.yaml").read_text())
        assert saved["seed"] == seed
    assert table["trainable_params"].iloc[0] < table["trainable_params"].iloc[2]
    assert table[["seconds_per_epoch", "best_val_loss", "BLEU-4", "CIDEr"]].notna().all().all()
    assert table["example_caption"].str.len().min() > 0
    assert (folder / "study" / "loss_curves.png").stat().st_size > 1000
    summary = next(c for c in nb.cells if c.cell_type == "code" and "summarize(" in c.source)
    assert text_outputs(summary).count(" ± ") >= 8                         # 2 variants x 4 measures, mean ± std
    assert has_image(nb.cells[-1])                                           # the overlaid curves, shown


@pytest.mark.slow
def test_scst_notebook_trains_xe_then_each_scst_variant_from_it_and_shows_the_reward_curves(shapes_dir, tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    save_config(tiny_config(shapes_dir, "unused", "train.epochs=1"), folder / "base.yaml")
    scst = {"from": "xe", "train.objective": "scst", "train.monitor": "cider", "train.epochs": 1,
            "train.scheduler": "constant", "scst.samples": 3, "scst.max_words": 8}
    study = {"base": "base.yaml", "run_root": "../runs", "seeds": [0],
             "set": {"data.images": "../shapes/flickr30k_images", "data.captions": "../shapes/results.csv"},
             "variants": {"xe": {}, "scst_mean": scst, "scst_greedy": {**scst, "scst.baseline": "greedy"}}}
    (tmp_path / "shapes").symlink_to(shapes_dir, target_is_directory=True)
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))      # xe first: the others start from it
    nb = execute("extra_research/scst.ipynb", tmp_path / "scst.ipynb", study=str(folder / "study.yaml"))
    table = pd.read_csv(folder / "study" / "results.csv")
    assert list(table["variant"]) == ["xe", "scst_mean", "scst_greedy"]
    for variant in ("scst_mean", "scst_greedy"):
        saved = yaml.safe_load((tmp_path / "runs" / variant / "seed0" / "config.yaml").read_text())
        assert saved["train"]["init_from"] == str(tmp_path / "runs" / "xe" / "seed0" / "best.pt")
    assert table[["CIDEr", "shapes_accuracy", "mean_words", "function_word_end", "distinct_1",
                  "distinct_2"]].notna().all().all()
    assert (folder / "study" / "reward_curves.png").stat().st_size > 1000
    assert has_image(nb.cells[-1])
