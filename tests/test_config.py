"""Config: YAML + --set overrides fill one dataclass tree; every bad key or value is refused by name."""
import dataclasses
import logging
from pathlib import Path

import pytest

from captioning.config import RENAMED, Config, ConfigError, from_dict, load_config, save_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# paths that need not exist: format shapes generates its data, so they are not checked
SHAPES = {"data": {"format": "shapes", "images": "/nonexistent/images", "captions": "/nonexistent/results.csv"}}


def raises_naming(key: str, raw: dict, overrides=(), check_paths: bool = False) -> str:
    """from_dict must raise ConfigError whose message names `key` (quoted, so 'model.d_model' != 'model.d_modelx')."""
    with pytest.raises(ConfigError) as info:
        from_dict(raw, list(overrides), check_paths=check_paths)
    message = str(info.value)
    assert f"'{key}'" in message, message
    return message


def real_data(tmp_path: Path) -> dict:
    (tmp_path / "images").mkdir()
    (tmp_path / "results.csv").write_text("image_name| comment_number| comment\n")
    return {"data": {"format": "flickr30k", "images": str(tmp_path / "images"),
                     "captions": str(tmp_path / "results.csv")}}


# --- loading and overrides ---------------------------------------------------

def test_load_yaml_fills_the_dataclasses(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: runs/x\nseed: 7\n"
                    "data:\n  format: shapes\n  image_size: 64\n"
                    "model:\n  backbone: resnet18\n  pretrained: false\n  d_model: 128\n  num_heads: 4\n"
                    "train:\n  lr: 3.0e-4\n  precision: bf16\n")
    cfg = load_config(path, check_paths=False)
    assert isinstance(cfg, Config)
    assert (cfg.run_dir, cfg.seed) == ("runs/x", 7)
    assert (cfg.data.format, cfg.data.image_size) == ("shapes", 64)
    m = cfg.model
    assert (m.backbone, m.pretrained, m.d_model, m.num_heads) == ("resnet18", False, 128, 4)
    assert (cfg.train.lr, cfg.train.precision) == (3e-4, "bf16")
    # keys the file leaves out keep their defaults
    assert cfg.train.gamma == Config().train.gamma and cfg.model.num_encoder_layers == Config().model.num_encoder_layers


def test_empty_yaml_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path, check_paths=False) == Config()


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_read_as_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  d_model: 512\n  num_heads: 8\ntrain:\n  lr: 5.0e-5\n")
    cfg = load_config(path, ["train.lr=1e-4", "model.d_model=256", "model.pretrained=false", "train.precision=fp16",
                             "seed=3", "data.format=shapes"], check_paths=False)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.d_model == 256 and isinstance(cfg.model.d_model, int)
    assert cfg.model.pretrained is False
    assert (cfg.train.precision, cfg.seed, cfg.data.format) == ("fp16", 3, "shapes")
    assert cfg.model.num_heads == 8  # untouched keys stay as the file says


def test_from_dict_overrides_do_not_modify_the_input():
    raw = {"model": {"d_model": 512}, **SHAPES}
    cfg = from_dict(raw, ["train.lr=1e-4", "model.d_model=256"], check_paths=False)
    assert (cfg.train.lr, cfg.model.d_model) == (1e-4, 256)
    assert raw == {"model": {"d_model": 512}, **SHAPES}


def test_override_creates_a_missing_section():
    cfg = from_dict({}, ["train.batch_size=7", *[f"data.{k}={v}" for k, v in SHAPES["data"].items()]])
    assert cfg.train.batch_size == 7


@pytest.mark.parametrize("item", ["train.lr", "=3", "  =3"])
def test_malformed_override_is_a_config_error(item):
    with pytest.raises(ConfigError, match="key=value"):
        from_dict(SHAPES, [item], check_paths=False)


def test_override_into_a_non_section_is_refused():
    raises_naming("seed", {"seed": 0, **SHAPES}, ["seed.x=1"])
    raises_naming("seed", SHAPES, ["seed.x=1"])


# --- coercion ------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("5", 5.0), ("5e-5", 5e-5), ("'5e-5'", 5e-5), ("5.0e-5", 5e-5),
                                         ("0.001", 1e-3)])
def test_float_given_as_int_or_exponent_string_is_coerced(tmp_path, text, value):
    path = tmp_path / "run.yaml"
    path.write_text(f"train:\n  lr: {text}\n")
    cfg = load_config(path, check_paths=False)
    assert type(cfg.train.lr) is float and cfg.train.lr == value


def test_int_is_not_silently_made_from_a_float_or_bool():
    raises_naming("model.d_model", SHAPES, ["model.d_model=256.0"])
    raises_naming("train.epochs", SHAPES, ["train.epochs=true"])


# --- errors name the key -------------------------------------------------------

def test_unknown_top_level_key_is_named():
    message = raises_naming("sede", {"sede": 1, **SHAPES})
    assert "unknown" in message


def test_unknown_nested_key_is_named():
    message = raises_naming("model.d_modl", {"model": {"d_modl": 256}, **SHAPES})
    assert "unknown" in message
    raises_naming("model.d_modl", SHAPES, ["model.d_modl=256"])  # the same through --set
    raises_naming("train.lr_rate", SHAPES, ["train.lr_rate=1"])


@pytest.mark.parametrize("override, key", [
    ("model.d_model=big", "model.d_model"),
    ("train.lr=fast", "train.lr"),
    ("model.pretrained=maybe", "model.pretrained"),
    ("data.format=3", "data.format"),
    ("seed=[1, 2]", "seed"),
    ("train.batch_size=null", "train.batch_size"),
])
def test_wrong_type_names_the_key(override, key):
    message = raises_naming(key, SHAPES, [override])
    assert "must be" in message


def test_a_section_given_a_scalar_names_the_section():
    with pytest.raises(ConfigError, match="model"):
        from_dict({"model": 3, **SHAPES}, check_paths=False)


def test_d_model_not_divisible_by_heads_names_d_model():
    message = raises_naming("model.d_model", SHAPES, ["model.d_model=100", "model.num_heads=8"])
    assert "100" in message and "8" in message
    assert from_dict(SHAPES, ["model.d_model=96", "model.num_heads=8"], check_paths=False).model.d_model == 96


@pytest.mark.parametrize("override, key", [
    ("data.format=parquet", "data.format"),
    ("data.format=Flickr30k", "data.format"),
    ("train.precision=fp64", "train.precision"),
    ("train.precision=half", "train.precision"),
    ("train.lr=0", "train.lr"),
    ("train.gamma=1.5", "train.gamma"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.backbone=vit_b_16", "model.backbone"),
    ("data.image_size=16", "data.image_size"),
    ("data.min_freq=0", "data.min_freq"),
    ("model.num_heads=0", "model.num_heads"),
    ("data.val_fraction=0.5", "data.val_fraction"),
    ("train.device=tpu", "train.device"),
])
def test_bad_values_name_the_key(override, key):
    raises_naming(key, SHAPES, [override])


@pytest.mark.parametrize("fmt", ["flickr30k", "karpathy", "csv", "shapes"])
@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16", "fp16"])
def test_every_documented_format_and_precision_is_accepted(fmt, precision):
    cfg = from_dict({"data": {"format": fmt}, "train": {"precision": precision}}, check_paths=False)
    assert (cfg.data.format, cfg.train.precision) == (fmt, precision)


# --- data paths --------------------------------------------------------------------

def test_missing_images_folder_names_data_images(tmp_path):
    raw = real_data(tmp_path)
    raw["data"]["images"] = str(tmp_path / "no_such_folder")
    message = raises_naming("data.images", raw, check_paths=True)
    assert "no_such_folder" in message


def test_missing_captions_file_names_data_captions(tmp_path):
    raw = real_data(tmp_path)
    raw["data"]["captions"] = str(tmp_path / "no_such_file.csv")
    message = raises_naming("data.captions", raw, check_paths=True)
    assert "no_such_file.csv" in message


def test_existing_data_paths_pass(tmp_path):
    cfg = from_dict(real_data(tmp_path), check_paths=True)
    assert cfg.data.images == str(tmp_path / "images")


@pytest.mark.parametrize("fmt", ["flickr30k", "karpathy", "csv"])
def test_check_paths_false_skips_the_path_check(fmt):
    raw = {"data": {"format": fmt, "images": "/nonexistent/images", "captions": "/nonexistent/c.csv"}}
    with pytest.raises(ConfigError, match="'data.images'"):
        from_dict(raw, check_paths=True)
    assert from_dict(raw, check_paths=False).data.format == fmt


def test_format_shapes_does_not_need_its_data_yet():
    assert from_dict(SHAPES, check_paths=True).data.format == "shapes"


# --- committed configs ---------------------------------------------------------------

def _committed(name: str) -> Config:
    path = CONFIGS / name
    if not path.is_file():
        pytest.skip(f"{path} is not committed yet")
    return load_config(path, check_paths=False)


def test_shapes_yaml_is_the_embedded_cpu_default():
    cfg = _committed("shapes.yaml")
    assert cfg.data.format == "shapes"
    assert cfg.model.pretrained is False  # nothing to download on a fresh machine
    assert from_dict(to_dict(cfg), check_paths=True) == cfg  # format shapes: runs before its data exists


def test_flickr30k_yaml_holds_the_reference_hyper_parameters():
    cfg = _committed("flickr30k.yaml")
    m, t = cfg.model, cfg.train
    assert cfg.data.format in ("flickr30k", "karpathy") and cfg.data.min_freq == 5
    assert (m.backbone, m.d_model, m.num_heads, m.num_encoder_layers, m.num_decoder_layers, m.dropout) == \
        ("resnet152", 512, 8, 6, 6, 0.1)
    assert (t.lr, t.gamma) == (5e-5, 0.95)


def test_scst_configs_start_from_their_cross_entropy_run_with_the_same_model():
    for name, first in (("shapes_scst.yaml", "shapes.yaml"), ("coco_scst.yaml", "coco.yaml")):
        cfg, xe = _committed(name), _committed(first)
        assert cfg.train.objective == "scst" and cfg.train.monitor == "cider"
        assert cfg.train.init_from == f"{xe.run_dir}/best.pt" and cfg.model == xe.model and cfg.data == xe.data
        assert (cfg.scst.samples, cfg.scst.baseline, cfg.scst.max_words) == (5, "mean", 20)
        assert cfg.train.scheduler == "constant" and cfg.train.grad_clip > 0
    coco = _committed("coco_scst.yaml")
    assert (coco.train.lr, coco.train.eval_beam) == (5e-6, 5)                 # the published recipe


def test_dmodel128_yaml_is_the_reference_variant():
    cfg = _committed("dmodel128.yaml")
    assert (cfg.model.d_model, cfg.model.num_heads) == (128, 4)


# --- round trip and the documented keys ------------------------------------------------

def test_save_then_load_round_trips(tmp_path):
    cfg = from_dict({"run_dir": "runs/rt", "seed": 11,
                     "data": {"format": "csv", "images": "imgs", "captions": "c.csv", "min_freq": 2,
                              "val_fraction": 0.1},
                     "model": {"backbone": "resnet34", "pretrained": False, "train_backbone": False, "d_model": 256,
                               "num_heads": 4, "dropout": 0.25},
                     "train": {"lr": 1e-4, "gamma": 0.9, "precision": "bf16", "cache_features": True,
                               "grad_clip": 1.5}},
                    check_paths=False)
    assert cfg != Config()
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml", check_paths=False)
    assert again == cfg
    assert to_dict(again) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("key", [
    "run_dir", "seed", "data.format", "data.images", "data.captions", "data.image_size", "data.min_freq",
    "model.backbone", "model.pretrained", "model.train_backbone", "model.d_model", "model.num_heads",
    "model.num_encoder_layers", "model.num_decoder_layers", "model.dim_feedforward", "model.dropout",
    "train.epochs", "train.batch_size", "train.lr", "train.gamma", "train.patience", "train.precision",
    "train.cache_features", "train.num_workers",
])
def test_every_documented_key_exists(key):
    node = to_dict(Config())
    for part in key.split("."):
        assert part in node, key
        node = node[part]


# --- renamed keys (max_len -> max_words / max_tokens) -----------------------------------

def config_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "captioning.config" and r.levelno == logging.WARNING]


def test_old_key_names_load_with_one_warning_each(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text("data:\n  format: shapes\n  max_len: 12\nmodel:\n  max_len: 30\n")
    with caplog.at_level(logging.WARNING, logger="captioning.config"):
        cfg = load_config(path, check_paths=False)
    assert (cfg.data.max_words, cfg.model.max_tokens) == (12, 30)
    warnings = config_warnings(caplog)
    assert len(warnings) == 2, warnings
    for old, new in RENAMED.items():
        (line,) = [w for w in warnings if f"'{old}'" in w]
        assert f"'{new}'" in line and "\n" not in line
    assert "max_len" not in to_dict(cfg)["data"] and "max_len" not in to_dict(cfg)["model"]


def test_old_key_names_in_a_dict_and_in_overrides_load(caplog):
    """A checkpoint's config dict, and --set, may use the old names too."""
    with caplog.at_level(logging.WARNING, logger="captioning.config"):
        cfg = from_dict({"data": {**SHAPES["data"], "max_len": 9}, "model": {"max_len": 11}}, check_paths=False)
    assert (cfg.data.max_words, cfg.model.max_tokens) == (9, 11)
    assert len(config_warnings(caplog)) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="captioning.config"):
        cfg = from_dict(SHAPES, ["data.max_len=7", "model.max_len=10"], check_paths=False)
    assert (cfg.data.max_words, cfg.model.max_tokens) == (7, 10)
    assert len(config_warnings(caplog)) == 2


def test_new_key_names_load_without_a_warning(tmp_path, caplog):
    path = tmp_path / "new.yaml"
    path.write_text("data:\n  format: shapes\n  max_words: 12\nmodel:\n  max_tokens: 30\n")
    with caplog.at_level(logging.WARNING, logger="captioning.config"):
        cfg = load_config(path, check_paths=False)
    assert (cfg.data.max_words, cfg.model.max_tokens) == (12, 30)
    assert config_warnings(caplog) == []


@pytest.mark.parametrize("old, new", sorted(RENAMED.items()))
def test_old_and_new_name_together_is_an_error_naming_both(tmp_path, old, new):
    section, old_key = old.split(".")
    new_key = new.split(".")[1]
    raw = {**SHAPES, section: {**SHAPES.get(section, {}), old_key: 30, new_key: 30}}
    with pytest.raises(ConfigError) as info:
        from_dict(raw, check_paths=False)
    assert f"'{old}'" in str(info.value) and f"'{new}'" in str(info.value), str(info.value)
    path = tmp_path / "both.yaml"
    path.write_text(f"{section}:\n  {old_key}: 30\n  {new_key}: 30\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, check_paths=False)
    assert f"'{old}'" in str(info.value) and f"'{new}'" in str(info.value), str(info.value)


# --- base: other.yaml ------------------------------------------------------------------------

def test_base_chain_overrides_and_merges_sections(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "run_dir: runs/base\nseed: 5\n"
        "data:\n  format: shapes\n  image_size: 64\n  min_freq: 2\n"
        "model:\n  backbone: resnet18\n  d_model: 256\n  num_heads: 8\n  dropout: 0.2\n"
        "train:\n  lr: 1.0e-4\n  epochs: 7\n")
    (tmp_path / "child.yaml").write_text(
        "base: base.yaml\nrun_dir: runs/child\n"
        "model:\n  d_model: 128\n  num_heads: 4\n"
        "train:\n  lr: 3.0e-4\n")
    cfg = load_config(tmp_path / "child.yaml", check_paths=False)
    assert cfg.run_dir == "runs/child" and cfg.seed == 5                      # top-level: child wins, base fills
    assert (cfg.model.d_model, cfg.model.num_heads) == (128, 4)               # the child's keys of a section...
    assert (cfg.model.backbone, cfg.model.dropout) == ("resnet18", 0.2)       # ...laid over the base's others
    assert (cfg.train.lr, cfg.train.epochs) == (3e-4, 7)
    assert (cfg.data.format, cfg.data.image_size, cfg.data.min_freq) == ("shapes", 64, 2)   # only in the base
    # overrides go on top of both
    assert load_config(tmp_path / "child.yaml", ["model.d_model=64", "seed=1"], check_paths=False).model.d_model == 64
    assert load_config(tmp_path / "base.yaml", check_paths=False).model.d_model == 256       # the base is untouched


def test_base_path_is_relative_to_the_file_not_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "common").mkdir()
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "common" / "root.yaml").write_text("seed: 9\ndata:\n  format: shapes\n")
    (tmp_path / "common" / "base.yaml").write_text("base: root.yaml\nmodel:\n  d_model: 64\n  num_heads: 4\n")
    (tmp_path / "runs" / "a" / "child.yaml").write_text("base: ../../common/base.yaml\ntrain:\n  epochs: 2\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(tmp_path / "runs" / "a" / "child.yaml", check_paths=False)
    assert (cfg.seed, cfg.data.format, cfg.model.d_model, cfg.train.epochs) == (9, "shapes", 64, 2)
    # and from the child's folder, by a relative path
    monkeypatch.chdir(tmp_path / "runs")
    assert load_config("a/child.yaml", check_paths=False) == cfg


def test_missing_base_file_is_named(tmp_path):
    (tmp_path / "child.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "child.yaml", check_paths=False)


def test_base_cycle_is_a_config_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("base: c.yaml\nseed: 2\n")
    (tmp_path / "c.yaml").write_text("base: a.yaml\nseed: 3\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml", check_paths=False)
    (tmp_path / "self.yaml").write_text("base: ./self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "self.yaml", check_paths=False)


def test_dmodel128_yaml_is_flickr30k_yaml_with_d_model_128():
    small, reference = _committed("dmodel128.yaml"), _committed("flickr30k.yaml")
    assert (small.model.d_model, small.model.num_heads) == (128, 4)
    a, b = to_dict(small), to_dict(reference)
    for section, key in (("model", "d_model"), ("model", "num_heads")):
        del a[section][key], b[section][key]
    assert a.pop("run_dir") != b.pop("run_dir")      # its own run directory
    assert a == b


# --- the new train keys -----------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("train.optimizer=sgd", "train.optimizer"),
    ("train.optimizer=AdamW", "train.optimizer"),
    ("train.weight_decay=-0.01", "train.weight_decay"),
    ("train.scheduler=step", "train.scheduler"),
    ("train.scheduler=Cosine", "train.scheduler"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.warmup_steps=1.5", "train.warmup_steps"),
    ("train.label_smoothing=1.0", "train.label_smoothing"),
    ("train.label_smoothing=-0.1", "train.label_smoothing"),
    ("data.split_seed=x", "data.split_seed"),
])
def test_new_keys_bad_values_name_the_key(override, key):
    raises_naming(key, SHAPES, [override])


def test_new_keys_good_values_are_accepted():
    cfg = from_dict(SHAPES, ["train.optimizer=adamw", "train.weight_decay=0.01", "train.scheduler=cosine",
                             "train.warmup_steps=100", "train.label_smoothing=0.1", "data.split_seed=3"],
                    check_paths=False)
    t = cfg.train
    assert (t.optimizer, t.weight_decay, t.scheduler, t.warmup_steps, t.label_smoothing) == \
        ("adamw", 0.01, "cosine", 100, 0.1)
    assert cfg.data.split_seed == 3
    assert (Config().train.optimizer, Config().train.scheduler, Config().train.label_smoothing) == \
        ("adam", "exponential", 0.0)     # the defaults are the reference's


def test_split_seed_changes_the_split_and_seed_does_not():
    from captioning.data.corpus import Corpus, make_splits

    corpus = Corpus(Path("/nonexistent"), {f"{i:05d}.jpg": [f"caption {i}"] for i in range(100)})
    fractions = ["data.val_fraction=0.1", "data.test_fraction=0.1"]

    def splits(*overrides):
        return make_splits(corpus, from_dict(SHAPES, [*fractions, *overrides], check_paths=False))

    base = splits("seed=0", "data.split_seed=0")
    assert len(base["val"]) == len(base["test"]) == 10
    assert splits("seed=1", "data.split_seed=0") == base
    assert splits("seed=12345", "data.split_seed=0") == base
    other = splits("seed=0", "data.split_seed=1")
    assert other["val"] != base["val"] and other["test"] != base["test"]
    assert sorted(sum(other.values(), [])) == sorted(sum(base.values(), []))   # the same images, split otherwise
