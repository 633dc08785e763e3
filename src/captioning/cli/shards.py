"""`python -m captioning shards`: every split of a config's data set as WebDataset tar shards
(data/shards.py), which `data.format: webdataset` trains from as a stream."""
from __future__ import annotations

from .args import positive_int


def add_shards(sub) -> None:
    p = sub.add_parser("shards", help="write a data set's splits as WebDataset tar shards "
                                      "(pip install -e '.[scale]')",
                       description="Write every split of the config's data set (the splits a run "
                                   "of it makes) as DIR/SPLIT-NNNNNN.tar: each image's original "
                                   "bytes as KEY.jpg|png|..., its captions, file name and split "
                                   "as KEY.json; then DIR/index.json (samples per shard, image "
                                   "names, the training split's word counts and vocabulary). "
                                   "Train from them with data.format: webdataset, data.shards: "
                                   "DIR.")
    p.add_argument("--config", required=True, help="the config whose data.* keys name the data")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.min_freq=1 (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="the shards' folder")
    p.add_argument("--shard-size", type=positive_int, default=1000, metavar="N",
                   help="images per shard (default 1000)")
    p.set_defaults(func=shards)


def shards(args) -> int:
    from ..config import ConfigError, load_config, validate
    from ..data.shards import require_webdataset, write_shards

    require_webdataset("the shards command")
    cfg = load_config(args.config, args.set, check_paths=False)
    if cfg.data.format == "webdataset":
        raise ConfigError(f"config key 'data.format': {args.config} already reads shards "
                          "(webdataset): give the config of the images and captions they come from")
    validate(cfg)                       # now the paths: the images and captions must be there
    index = write_shards(cfg, args.out, shard_size=args.shard_size)
    for split, entry in index["splits"].items():
        skipped = f" ({entry['skipped']} unreadable left out)" if entry["skipped"] else ""
        print(f"{split}: {entry['samples']} images in {len(entry['shards'])} shard(s){skipped}")
    print(f"{len(index['vocab'])} words at data.min_freq={index['min_freq']}; "
          f"index: {args.out}/index.json")
    return 0
