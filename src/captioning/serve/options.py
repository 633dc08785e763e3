"""A request's decoding options: the CLI's flags under their API names, each parsed and range-
checked (a bad one: 422 naming it), then checked together by `Captioner.options` (the CLI's
messages). Bounds on beam and captions keep one request from costing the server minutes."""
from __future__ import annotations

import json
import math
from dataclasses import astuple, dataclass

MAX_BEAM = 16
MAX_CAPTIONS = 16
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class RequestError(Exception):
    """A request answered with `status` and the JSON {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _int(low: int | None = None, high: int | None = None):
    def check(v: int) -> bool:
        return (low is None or v >= low) and (high is None or v <= high)
    what = ("a whole number" + (f" in {low}..{high}" if high is not None else
                                f" >= {low}" if low is not None else ""))
    return int, check, what


# API name -> (Captioner.caption keyword, type, check, what a good value is)
OPTIONS = {
    "beam": ("beam_size", *_int(1, MAX_BEAM)),
    "num_captions": ("num_captions", *_int(1, MAX_CAPTIONS)),
    "temperature": ("temperature", float, lambda v: 0 < v <= 100, "a number in (0, 100]"),
    "top_k": ("top_k", *_int(0)),
    "top_p": ("top_p", float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "seed": ("seed", *_int(0, 2**63 - 1)),
    "no_repeat_ngram_size": ("no_repeat_ngram_size", *_int(0)),
    "min_words": ("min_words", *_int(0)),
    "max_words": ("max_words", *_int(1)),
    "length_penalty": ("length_penalty", float, lambda v: -10 <= v <= 10, "a number in [-10, 10]"),
    "attention": ("attention", bool, lambda v: True, "true or false"),
}
ALIASES = {"beam_size": "beam", "max_new_tokens": "max_words"}   # Captioner's and Hugging Face's


@dataclass(frozen=True)
class Options:
    keywords: dict          # Captioner.caption's keyword arguments
    batch_key: tuple | None  # equal keys share a batch; None: never batched (sampling)


def _value(name: str, raw, kind, check, what: str):
    shown = raw if isinstance(raw, str) else json.dumps(raw)
    bad = RequestError(422, f"{name}={shown}: expected {what}")
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in TRUE + FALSE:
            return raw.strip().lower() in TRUE
        raise bad
    if isinstance(raw, bool) or raw is None:
        raise bad
    try:
        value = kind(raw.strip()) if isinstance(raw, str) else raw
    except ValueError:
        raise bad from None
    if kind is int and not isinstance(value, int):
        raise bad
    if kind is float and (not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise bad
    if not check(value):
        raise bad
    return value


def parse_options(raw: dict, captioner) -> Options:
    """{API name: value (JSON or a form's string)} -> Options; 422 for an unknown name, a bad
    value or a combination the Captioner refuses. Empty strings (a form's unset field) are unset."""
    keywords = {}
    for name, value in raw.items():
        key = ALIASES.get(name, name)
        if key not in OPTIONS:
            raise RequestError(422, f"unknown option {name!r}: the options are "
                                    f"{', '.join(OPTIONS)}")
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        keyword, kind, check, what = OPTIONS[key]
        keywords[keyword] = _value(key, value, kind, check, what)
    try:
        options = captioner.options(**keywords)
    except (TypeError, ValueError) as e:
        raise RequestError(422, str(e)) from None
    # the resolved options: beam=1 and no beam at all are the same batch
    batch_key = None if options.sampling else astuple(options)
    return Options(keywords, batch_key)
