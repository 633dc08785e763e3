"""A data set as WebDataset tar shards: `iter_samples` reads one shard (a local path or an
http(s) URL), `write_shards` writes every split of a config's data set (`python -m captioning
shards`), `find_shards` resolves `data.shards` into each split's shards and their sample counts.

A sample is two tar members with one key: `{key}.{ext}` (the image's original bytes and
extension) and `{key}.json` (`{"captions": [...], "name": the original file name, "split": ...}`).
Shards are SPLIT-NNNNNN.tar; index.json beside them holds each shard's sample count, each split's
image names, and the training split's word counts (any data.min_freq's vocabulary) with the
vocabulary of the writer's data.min_freq and its sha256. `iter_samples` needs the standard library
and requests only; the rest needs webdataset (the `[scale]` extra) for its brace patterns.
"""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests
import urllib3
from PIL import Image
from tqdm.auto import tqdm

from ..config import Config, ConfigError, EnvironmentProblem
from ..files import remove_temporary, write_atomic
from .vocab import SPECIALS, Vocabulary, tokenize

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "captioning-shards/1"
SPLIT_NAMES = ("train", "val", "test")
SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")
# PIL's format -> the extension a shard stores an image under when its file name has none it knows
PIL_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
                  "TIFF": "tiff"}
KNOWN_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
URL_TIMEOUT_S = 60
# a key is everything before the first dot of a member's base name, as webdataset groups them
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class ShardError(ValueError):
    """A shard that cannot be read: a missing file, a broken tar, a sample without its parts."""


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _open_stream(url_or_path: str):
    """A readable binary stream of the shard's bytes, and a closer."""
    if is_url(url_or_path):
        try:
            response = requests.get(url_or_path, stream=True, timeout=URL_TIMEOUT_S)
        except requests.RequestException as e:
            raise ShardError(f"shard {url_or_path}: {e}") from None
        if not response.ok:
            response.close()
            raise ShardError(f"shard {url_or_path}: HTTP {response.status_code} {response.reason}")
        response.raw.decode_content = True
        return response.raw, response.close
    path = Path(url_or_path.removeprefix("file://")).expanduser()
    try:
        f = open(path, "rb")    # noqa: SIM115 (closed by the caller's closer)
    except OSError as e:
        raise ShardError(f"shard {url_or_path}: {e.strerror or e}") from None
    return f, f.close


def _members(url_or_path: str) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of each regular file in the shard, in tar order."""
    stream, close = _open_stream(url_or_path)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                match = _KEY_EXT.match(info.name)
                if match is None:
                    raise ShardError(f"shard {url_or_path}: member {info.name!r} has no extension")
                yield match.group(1), match.group(2).lower(), tar.extractfile(info).read()
                tar.members = []    # a stream of thousands of members keeps no list of them
    except (tarfile.TarError, EOFError, OSError, requests.RequestException,
            urllib3.exceptions.HTTPError) as e:     # the last: a connection lost mid-shard
        raise ShardError(f"shard {url_or_path}: not a readable tar file ({e})") from None
    finally:
        close()


def iter_samples(url_or_path: str) -> Iterator[tuple[str, bytes, str, dict]]:
    """(key, image bytes, image extension, meta) of each sample of one shard, in shard order.

    `url_or_path` is a local path (or file:// URL) or an http(s) URL; meta is the sample's json:
    `captions` (a list of str, possibly empty for an uncaptioned collection), `name` (the original
    file name) and `split`. A sample without an image or without its json is a ShardError.
    """
    key, parts = None, {}
    for member_key, ext, data in _members(url_or_path):
        if member_key != key:
            if key is not None:
                yield _sample(url_or_path, key, parts)
            key, parts = member_key, {}
        parts[ext] = data
    if key is not None:
        yield _sample(url_or_path, key, parts)


def _sample(url_or_path: str, key: str, parts: dict[str, bytes]) -> tuple[str, bytes, str, dict]:
    if "json" not in parts:
        raise ShardError(f"shard {url_or_path}: sample {key!r} has no .json")
    try:
        meta = json.loads(parts.pop("json"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"shard {url_or_path}: sample {key!r}'s .json is not JSON ({e})") from None
    if len(parts) != 1:
        found = ", ".join(sorted(parts)) or "none"
        raise ShardError(f"shard {url_or_path}: sample {key!r} needs exactly one image "
                         f"(found: {found})")
    (ext, image_bytes), = parts.items()
    return key, image_bytes, ext, meta


def require_webdataset(what: str = "data.format webdataset") -> None:
    if importlib.util.find_spec("webdataset") is None:
        raise EnvironmentProblem(f"{what} needs the webdataset package, which is not installed: "
                                 "pip install -e \".[scale]\" (or pip install webdataset)")


# ---------------------------------------------------------------- which shards, how many samples

@dataclass
class ShardSet:
    """data.shards resolved: each split's shard URLs (or paths) and their sample counts."""
    shards: dict[str, list[str]]                  # split -> shards, in name order
    counts: dict[str, list[int]]                  # split -> samples of each shard
    word_counts: dict[str, int] | None = None     # training captions' words (from the index)
    names: dict[str, list[str]] = field(default_factory=dict)   # split -> image names (index)
    index: str | None = None                      # where the index was read, if one was

    def vocabulary(self, min_freq: int) -> Vocabulary:
        """The training split's vocabulary: from the index's word counts, else one pass over the
        training shards' captions (only their .json is parsed)."""
        counts = self.word_counts
        if counts is None:
            log.info("no %s beside data.shards: reading the training captions for the vocabulary",
                     INDEX_NAME)
            counts = Counter(w for url in self.shards["train"] for *_, meta in iter_samples(url)
                             for c in meta.get("captions", []) for w in tokenize(c))
        return vocab_from_counts(counts, min_freq)


def vocab_from_counts(counts: dict[str, int], min_freq: int) -> Vocabulary:
    """Vocabulary.build's vocabulary from word counts: the same words, in the same order."""
    words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
    return Vocabulary(list(SPECIALS) + words)


def _parent(url_or_path: str) -> str:
    return url_or_path.rsplit("/", 1)[0] if "/" in url_or_path else "."


def read_text(url_or_path: str) -> str | None:
    """A small file's text, local or http(s); None when it is not there."""
    if is_url(url_or_path):
        try:
            response = requests.get(url_or_path, timeout=URL_TIMEOUT_S)
        except requests.RequestException as e:
            raise ConfigError(f"config key 'data.shards': {url_or_path}: {e}") from None
        return response.text if response.ok else None
    path = Path(url_or_path).expanduser()
    return path.read_text() if path.is_file() else None


def _read_index(location: str) -> dict | None:
    text = read_text(location)
    if text is None:
        return None
    try:
        index = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key 'data.shards': {location} is not JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ConfigError(f"config key 'data.shards': {location} is not an index the `shards` "
                          f"command wrote (no \"format\": \"{INDEX_FORMAT}\")")
    return index


def find_shards(spec: str) -> ShardSet:
    """data.shards -> a ShardSet. `spec` is a folder or an index.json (local or http(s)): the
    shards the index lists; or a brace pattern in webdataset's syntax (`::` joins several): those
    shards, each split told by its name (SPLIT-NNNNNN.tar), counted from the index.json beside
    them when there is one, else by reading them once."""
    require_webdataset()
    from webdataset.shardlists import expand_urls

    if not ("{" in spec or "::" in spec or spec.endswith(".tar")):
        index_at = spec if spec.endswith(".json") else f"{spec.rstrip('/')}/{INDEX_NAME}"
        index = _read_index(index_at)
        if index is None:
            raise ConfigError(f"config key 'data.shards': no {index_at} (write the shards with "
                              "`python -m captioning shards`, or name them by a pattern)")
        return _from_index(index, _parent(index_at), index_at)
    urls = expand_urls(spec)
    index_at = f"{_parent(urls[0])}/{INDEX_NAME}"
    index = _read_index(index_at)
    known = _from_index(index, _parent(index_at), index_at) if index else None
    shards: dict[str, list[str]] = {s: [] for s in SPLIT_NAMES}
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        if not SHARD_NAME.match(name):
            raise ConfigError(f"config key 'data.shards': {name!r} is not named SPLIT-NNNNNN.tar "
                              "(train, val or test), as the `shards` command names them")
        shards[name.split("-")[0]].append(url)
    by_url = {u: n for s in (known.shards if known else {}) for u, n in
              zip(known.shards[s], known.counts[s])}
    counts = {s: [by_url[u] if u in by_url else _count(u) for u in us] for s, us in shards.items()}
    return ShardSet(shards, counts, known and known.word_counts, known.names if known else {},
                    index_at if known else None)


def _count(url: str) -> int:
    return sum(1 for _ in iter_samples(url))


def _from_index(index: dict, base: str, index_at: str) -> ShardSet:
    shards, counts, names = {}, {}, {}
    for split in SPLIT_NAMES:
        entry = index["splits"].get(split, {"shards": {}})
        shards[split] = [f"{base}/{name}" for name in entry["shards"]]
        counts[split] = list(entry["shards"].values())
        names[split] = entry.get("names", [])
    return ShardSet(shards, counts, index.get("word_counts"), names, index_at)


# ---------------------------------------------------------------- writing

def image_extension(name: str, data: bytes) -> str | None:
    """The extension a shard stores an image under: its own when it is an image one webdataset
    decodes; else the one of the format PIL finds in its bytes; None when PIL cannot read it."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""
    if ext in KNOWN_EXTENSIONS:
        return ext
    try:
        with Image.open(io.BytesIO(data)) as image:
            return PIL_EXTENSIONS.get(image.format)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)    # fixed owner, mode and time: the same data gives the same bytes
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, bytes, str, dict]]) -> None:
    """A shard of (key, bytes, extension, meta) samples, whole or not at all."""
    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, data, ext, meta in samples:
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
    write_atomic(path, write)
    path.chmod(0o644)                   # readable by whoever serves or reads them, as tar writes


def write_shards(cfg: Config, out_dir: str | Path, shard_size: int = 1000,
                 progress: bool = True) -> dict:
    """Every split of the config's data set (`make_splits`: the run's splits) as shards in
    `out_dir`, then index.json; returns the index. Each shard and the index are written whole or
    not at all (a temporary file renamed), the index last: a folder without one is unfinished."""
    from .corpus import make_splits, read_corpus

    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    corpus = read_corpus(cfg)
    splits = make_splits(corpus, cfg)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_NAME).unlink(missing_ok=True)       # unfinished until the new one is written
    index = {"format": INDEX_FORMAT, "splits": {},
             "source": {"format": cfg.data.format, "images": str(corpus.images_dir),
                        "captions": cfg.data.captions}}
    bar = tqdm(total=sum(map(len, splits.values())), desc="shards", unit="image",
               disable=not progress)
    for split in SPLIT_NAMES:
        index["splits"][split] = _write_split(corpus, split, splits.get(split, []), out,
                                              shard_size, bar)
    bar.close()
    words = Counter(w for n in index["splits"]["train"]["names"] for c in corpus.captions[n]
                    for w in tokenize(c))
    vocab = vocab_from_counts(words, cfg.data.min_freq)
    index.update(word_counts=dict(sorted(words.items())), min_freq=cfg.data.min_freq,
                 vocab=vocab.to_list(), vocab_sha256=vocab.fingerprint())
    write_atomic(out / INDEX_NAME, lambda f: f.write(json.dumps(index, indent=1)), mode="w")
    (out / INDEX_NAME).chmod(0o644)
    return index


def _write_split(corpus, split: str, names: list[str], out: Path, shard_size: int, bar) -> dict:
    written, kept, unreadable, batch = {}, [], [], []

    def flush() -> None:
        name = f"{split}-{len(written):06d}.tar"
        write_shard(out / name, batch)
        written[name] = len(batch)
        batch.clear()

    for name in names:
        data = (corpus.images_dir / name).read_bytes()
        ext = image_extension(name, data)
        bar.update()
        if ext is None:
            unreadable.append(name)
            continue
        meta = {"captions": corpus.captions[name], "name": name, "split": split}
        batch.append((f"{split}_{len(kept):07d}", data, ext, meta))
        kept.append(name)
        if len(batch) == shard_size:
            flush()
    if batch:
        flush()
    for old in out.glob(f"{split}-*.tar"):          # shards of an earlier, larger writing
        if SHARD_NAME.match(old.name) and old.name not in written:
            old.unlink()
    for name in written:
        remove_temporary(out, name)
    if unreadable:
        log.warning("%s split: %d image(s) PIL cannot read were left out (e.g. %s): "
                    "`python -m captioning check-data` lists them", split, len(unreadable),
                    ", ".join(unreadable[:3]))
    return {"shards": written, "samples": len(kept), "names": kept, "skipped": len(unreadable)}


# ---------------------------------------------------------------- checking

def scan_shards(found: ShardSet, progress: bool = True) -> dict:
    """Read every shard of `found` and decode every image: {"captions": {name: captions},
    "sizes": {name: (w, h) or why it does not decode}, "splits": {split: names}, "problems":
    [a shard that does not read, or holds another count than its index says]}."""
    from .images import open_image

    captions, sizes, problems = {}, {}, []
    splits: dict[str, list[str]] = {s: [] for s in found.shards}
    bar = tqdm(total=sum(map(len, found.shards.values())), desc="reading shards", unit="shard",
               disable=not progress)
    for split, urls in found.shards.items():
        for url, expected in zip(urls, found.counts[split]):
            read = 0
            try:
                for key, data, _, meta in iter_samples(url):
                    name = meta.get("name") or key
                    read += 1
                    captions[name] = [c for c in meta.get("captions", []) if c.strip()]
                    splits[split].append(name)
                    try:
                        sizes[name] = open_image(data).size
                    except Exception as e:  # noqa: BLE001 -- reported by name, the others go on
                        sizes[name] = str(e) or type(e).__name__
            except ShardError as e:
                problems.append(str(e))
                read = expected          # one problem a shard
            if read != expected:
                problems.append(f"{url}: {read} sample(s), its index says {expected}")
            bar.update()
    bar.close()
    return {"captions": captions, "sizes": sizes, "splits": splits, "problems": problems}
