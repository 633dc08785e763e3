"""The notebooks, run headless with papermill on tiny settings; each test checks what the notebook made."""
import functools
import http.server
import json
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml

from captioning.config import save_config

from conftest import tiny_config

papermill = pytest.importorskip("papermill")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def execute(notebook: str, out: Path, **parameters):
    """Run a notebook from the repo root with its parameters cell overridden; returns the executed notebook."""
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


def test_committed_notebooks_have_a_tagged_parameters_cell_and_outputs_of_a_real_run():
    for notebook in ("training.ipynb", "inference.ipynb", "extra_research/dmodel_study.ipynb"):
        cells = json.loads((ROOT / notebook).read_text())["cells"]
        tagged = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
        assert len(tagged) == 1, f"{notebook}: expected one cell tagged 'parameters'"
        assert "real run" in "".join(cells[0]["source"]), f"{notebook}: the first cell says where its outputs come from"
        code = [c for c in cells if c["cell_type"] == "code"]
        assert all(c.get("execution_count") for c in code), f"{notebook}: committed without running every cell"
        assert not any(o.get("output_type") == "error" for c in code for o in c["outputs"]), notebook


def test_training_notebook_trains_evaluates_and_shows(shapes_dir, tmp_path):
    cfg = tiny_config(shapes_dir, tmp_path / "run")
    save_config(cfg, tmp_path / "tiny.yaml")
    nb = execute("training.ipynb", tmp_path / "training.ipynb", config=str(tmp_path / "tiny.yaml"),
                 overrides=["train.epochs=2"], examples=3, figures_dir=str(tmp_path / "figures"))
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
    assert sum(has_image(c) for c in nb.cells) >= 3                         # data, history, predictions


@pytest.fixture
def image_server(shapes_dir):
    """The Shapes images over http on 127.0.0.1 (no test touches the internet)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shapes_dir / "flickr30k_images"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_inference_notebook_captions_paths_and_urls_and_reports_bad_inputs(tiny_run, shapes_dir, image_server,
                                                                          tmp_path):
    names = sorted(p.name for p in (shapes_dir / "flickr30k_images").iterdir())[:2]
    images = [str(shapes_dir / "flickr30k_images" / names[0]), f"{image_server}/{names[1]}",
              str(tmp_path / "missing.jpg")]
    nb = execute("inference.ipynb", tmp_path / "inference.ipynb", checkpoint=str(tiny_run / "best.pt"),
                 images=images, beam_size=2)
    batch = text_outputs(nb.cells[-1])                                     # the batch's table, one row per input
    for source in images:
        assert source in batch
    assert "missing.jpg" in batch and "error" in batch
    one_by_one = next(c for c in nb.cells if c.cell_type == "code" and "for source in images" in c.source)
    assert sum(has_image({"outputs": [o]}) for o in one_by_one.outputs) == 2   # the two good images, drawn
    assert "missing.jpg" in text_outputs(one_by_one)


def test_inference_notebook_defaults_to_held_out_test_images(tiny_run, tmp_path):
    nb = execute("inference.ipynb", tmp_path / "inference.ipynb", checkpoint=str(tiny_run / "best.pt"), examples=2)
    test_names = json.loads((tiny_run / "splits.json").read_text())["test"][:2]
    batch = text_outputs(nb.cells[-1])
    assert all(name in batch for name in test_names)
    assert "error" not in batch


def test_study_notebook_writes_the_table_and_the_overlaid_curves(shapes_dir, tmp_path):
    base = tiny_config(shapes_dir, tmp_path / "unused")
    save_config(base, tmp_path / "base.yaml")
    study = {"base": str(tmp_path / "base.yaml"), "run_root": str(tmp_path / "runs"),
             "set": {"train.epochs": 1},
             "variants": {"d16": {"model.d_model": 16, "model.num_heads": 2},
                          "d32": {"model.d_model": 32, "model.num_heads": 4}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    execute("extra_research/dmodel_study.ipynb", tmp_path / "study.ipynb", study=str(tmp_path / "study.yaml"),
            out_dir=str(tmp_path / "out"))
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(table["variant"]) == ["d16", "d32"]
    assert list(table["d_model"]) == [16, 32]
    assert table["trainable_params"].iloc[0] < table["trainable_params"].iloc[1]
    assert table[["seconds_per_epoch", "best_val_loss", "BLEU-4", "CIDEr"]].notna().all().all()
    assert table["example_caption"].str.len().min() > 0
    assert (tmp_path / "out" / "loss_curves.png").stat().st_size > 1000
