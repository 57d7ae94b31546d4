"""One start-up path for the command-line entry points (train.py, sample.py, python -m ldm.prefetch).

Two things every entry point needs before and around Hydra:

- **Brace patterns in shard keys.** WebDataset and img2dataset users name shards as `/data/{00000..01023}.tar`.
  Typed as the README shows, `data.train_shards='/data/{00000..01023}.tar'`, bash removes the quotes, and
  Hydra's override grammar then reads the braces as its own syntax and stops. `quote_shard_patterns` puts
  single quotes back around such a value, for the shard keys only (`data.train_shards`, `data.val_shards`
  and the `shards:` entries of a mixing list); every other argument passes through unchanged.
- **Errors a user can act on.** A bad setting (ConfigError) and a pretrained file that cannot be downloaded
  (a compute node without internet) end with one `error:` line and exit status 2, not a traceback.
"""

from __future__ import annotations

import re
import socket
import sys
import urllib.error
from collections.abc import Callable
from typing import Any

SHARD_KEYS = ("data.train_shards", "data.val_shards", "ref_shards")  # ref_shards: python -m ldm.evaluate
EXIT_BAD_SETTING = 2

_KEYS = "|".join(map(re.escape, SHARD_KEYS))
_SHARD_OVERRIDE = re.compile(rf"^(?P<key>(?:\+{{1,2}}|~)?(?:{_KEYS}))=(?P<value>.*)$", re.S)


def _top_level_split(value: str, separators: str) -> list[tuple[int, int]]:
    """Spans of `value` between `separators` that sit outside quotes, braces and brackets."""
    spans, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(value):
        if quote:
            if char == "\\":
                continue
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "{[(":
            depth += 1
        elif char in "}])":
            depth -= 1
        elif char in separators and depth == 0:
            spans.append((start, i))
            start = i + 1
    spans.append((start, len(value)))
    return spans


def _quote(token: str) -> str:
    """A bare token holding a brace pattern, single-quoted for Hydra; anything else unchanged."""
    stripped = token.strip()
    if "{" not in stripped or stripped[:1] in "'\"[":
        return token
    lead = token[: len(token) - len(token.lstrip())]
    trail = token[len(token.rstrip()):]
    return f"{lead}'{stripped.replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}'{trail}"


_SHARDS_ENTRY = re.compile(r"(?P<head>\bshards\s*:\s*)")


def _quote_mixing_list(value: str) -> str:
    """`[{shards: /a/{0..9}.tar, weight: 3}, ...]`: quote each bare `shards:` value holding a brace pattern."""
    out, pos = [], 0
    for match in _SHARDS_ENTRY.finditer(value):
        start = match.end()
        if start < pos:
            continue
        # The entry's value runs to the first ',' or '}' outside its own braces (or to the end).
        depth, end = 0, len(value)
        for i in range(start, len(value)):
            char = value[i]
            if char == "{":
                depth += 1
            elif char == "}":
                if depth == 0:
                    end = i
                    break
                depth -= 1
            elif char in ",]" and depth == 0:
                end = i
                break
        out.append(value[pos:start])
        out.append(_quote(value[start:end]))
        pos = end
    out.append(value[pos:])
    return "".join(out)


def quote_shard_patterns(argv: list[str]) -> list[str]:
    """Command-line overrides with brace patterns in shard keys quoted for Hydra (see the module docstring).

    A value that already carries quotes is left as it is; under `-m`, each comma-separated sweep value is
    quoted on its own.
    """
    result = []
    for arg in argv:
        match = _SHARD_OVERRIDE.match(arg)
        if not match or "{" not in match["value"]:
            result.append(arg)
            continue
        value = match["value"]
        if value.lstrip().startswith("["):
            value = _quote_mixing_list(value)
        else:
            value = ",".join(_quote(value[a:b]) for a, b in _top_level_split(value, ","))
        result.append(f"{match['key']}={value}")
    return result


_NETWORK_ERRORS: tuple[type[BaseException], ...] = (urllib.error.URLError, socket.gaierror, socket.timeout,
                                                     ConnectionError)


def _network_errors() -> tuple[type[BaseException], ...]:
    errors = list(_NETWORK_ERRORS)
    try:
        import requests

        errors.append(requests.exceptions.ConnectionError)
    except ImportError:  # pragma: no cover - a dependency of huggingface_hub
        pass
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        errors += [LocalEntryNotFoundError, OfflineModeIsEnabled]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _download_target(err: BaseException) -> str | None:
    """The URL or hub file a failed download was after, read from the innermost frames that name one."""
    tb, found = err.__traceback__, None
    while tb is not None:
        names = tb.tb_frame.f_locals
        for key in ("url", "repo_id", "filename", "model_id"):
            value = names.get(key)
            if isinstance(value, str) and value:
                found = value
                break
        tb = tb.tb_next
    return found


def explain_download_failure(err: BaseException) -> str | None:
    """One message for a pretrained file that could not be fetched (None when `err` is something else)."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    failed = next((e for e in chain if isinstance(e, _network_errors())), None)
    if failed is None:
        return None
    target = next((t for t in map(_download_target, chain) if t), None)
    what = f" {target}" if target else ""
    return (f"could not download pretrained weights{what} ({type(failed).__name__}: {failed}). "
            "This node has no internet, or the host is unreachable. Either fetch them where there is internet "
            "with `python -m ldm.prefetch <the same overrides> paths.weights_cache=DIR` and run here with "
            "`paths.weights_cache=DIR offline=true`, or point the setting to a local file "
            "(e.g. stage.module.metrics.fid.feature_extractor_weights_path=..., "
            "stage.module.loss.lpips_weights_path=..., model.text_encoder.cache_dir=...)")


def run_reporting_errors(fn: Callable[[], Any]) -> Any:
    """Run an entry point's body; settings that cannot work end with one `error:` line and exit status 2."""
    from ldm.train.checks import ConfigError

    try:
        return fn()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_SETTING)
    except Exception as err:
        message = explain_download_failure(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_SETTING)
