"""Fine-tuning data in the LLaVA conversation format.

A dataset is a JSON list (or JSONL) of records::

    {"id": "0001", "image": "images/0001.png", "system": "optional system prompt",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "red"}]}

Image paths are relative to the dataset file, absolute, or ``s3://`` URIs. Loading checks every
record and reports all problems at once (line, id, reason) instead of stopping at the first; strict
mode raises, lenient mode skips the bad records and keeps the report.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from tcapguard.storage import (
    MissingObjectError,
    StorageError,
    atomic_write,
    exists,
    is_s3,
    join,
    read_bytes,
    write_bytes,
)

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("human", "gpt")


@dataclass(frozen=True)
class Turn:
    role: str  # "human" or "gpt"
    value: str


@dataclass
class Record:
    """One training sample. ``image`` is a path/URI; ``pixels`` holds an image not yet written."""

    id: str
    conversations: list[Turn]
    image: str | None = None
    system: str | None = None
    pixels: Image.Image | None = field(default=None, repr=False, compare=False)
    extra: dict = field(default_factory=dict)

    @property
    def query(self) -> str:
        """The first user turn without the image placeholder."""
        text = next(t.value for t in self.conversations if t.role == "human")
        return text.replace(IMAGE_PLACEHOLDER, "").strip()

    @property
    def response(self) -> str:
        """The first assistant turn."""
        return next(t.value for t in self.conversations if t.role == "gpt")

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.pixels is not None

    def with_query(self, query: str) -> Record:
        """A copy whose first user turn asks ``query`` (the image placeholder kept in place)."""
        turns = list(self.conversations)
        i = next(i for i, t in enumerate(turns) if t.role == "human")
        prefix = f"{IMAGE_PLACEHOLDER}\n" if IMAGE_PLACEHOLDER in turns[i].value else ""
        turns[i] = Turn("human", prefix + query)
        return replace(self, conversations=turns, extra=dict(self.extra))

    def with_response(self, response: str) -> Record:
        """A copy whose first assistant turn is ``response``."""
        turns = list(self.conversations)
        i = next(i for i, t in enumerate(turns) if t.role == "gpt")
        turns[i] = Turn("gpt", response)
        return replace(self, conversations=turns, extra=dict(self.extra))

    def to_json(self) -> dict:
        out: dict = {"id": self.id}
        if self.image is not None:
            out["image"] = self.image
        if self.system is not None:
            out["system"] = self.system
        out["conversations"] = [{"from": t.role, "value": t.value} for t in self.conversations]
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Problem:
    """Why one record was rejected; ``line`` is 1-based (JSONL line, or list index + 1)."""

    line: int
    id: str | None
    reason: str

    def __str__(self) -> str:
        who = f"id={self.id!r}" if self.id is not None else "no id"
        return f"record {self.line} ({who}): {self.reason}"


class DatasetError(ValueError):
    """The dataset has bad records; ``problems`` lists every one of them."""

    def __init__(self, source: str, problems: Sequence[Problem]):
        self.source = source
        self.problems = list(problems)
        shown = "\n  ".join(str(p) for p in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"{source}: {len(self.problems)} bad record(s)\n  {shown}{more}")


@dataclass
class Dataset:
    """Records plus the location that relative image paths resolve against."""

    records: list[Record]
    root: str | None = None  # directory (or s3:// prefix) of the dataset file
    problems: list[Problem] = field(default_factory=list)  # records skipped in lenient mode

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def image_uri(self, record: Record) -> str:
        """Where ``record``'s image lives, resolved against the dataset's root."""
        if record.image is None:
            raise ValueError(f"record {record.id!r} has no image")
        if is_s3(record.image) or os.path.isabs(record.image) or self.root is None:
            return record.image
        return f"{self.root.rstrip('/')}/{record.image}"

    def load_image(self, record: Record) -> Image.Image:
        """The record's image as RGB; :class:`StorageError` naming the record if unreadable."""
        if record.pixels is not None:
            return record.pixels.convert("RGB")
        uri = self.image_uri(record)
        try:
            with Image.open(io.BytesIO(read_bytes(uri))) as img:
                return img.convert("RGB")
        except StorageError as err:
            raise type(err)(f"record {record.id!r}: {err}") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise StorageError(f"record {record.id!r}: unreadable image {uri}: {err}") from err

    def subset(self, ids: Sequence[str] | set[str], *, exclude: bool = False) -> Dataset:
        """The records whose id is (or, with ``exclude``, is not) in ``ids``, order kept."""
        wanted = set(ids)
        kept = [r for r in self.records if (r.id in wanted) != exclude]
        return Dataset(kept, root=self.root)


def _parse_record(raw: object, line: int) -> tuple[Record | None, list[Problem]]:
    if not isinstance(raw, dict):
        return None, [Problem(line, None, f"expected a JSON object, got {type(raw).__name__}")]
    rid = raw.get("id")
    rid_str = str(rid) if rid is not None else None
    problems: list[Problem] = []

    def bad(reason: str) -> None:
        problems.append(Problem(line, rid_str, reason))

    if rid is None or str(rid).strip() == "":
        bad("missing 'id'")
    turns_raw = raw.get("conversations")
    turns: list[Turn] = []
    if not isinstance(turns_raw, list) or not turns_raw:
        bad("missing or empty 'conversations' list")
    else:
        for k, turn in enumerate(turns_raw):
            if not isinstance(turn, dict) or turn.get("from") not in ROLES:
                bad(f"conversations[{k}]: 'from' must be one of {ROLES}")
                continue
            value = turn.get("value")
            if not isinstance(value, str) or not value.replace(IMAGE_PLACEHOLDER, "").strip():
                bad(f"conversations[{k}]: empty text")
                continue
            turns.append(Turn(turn["from"], value))
        if not any(t.role == "human" for t in turns):
            bad("no human turn")
        if not any(t.role == "gpt" for t in turns):
            bad("no gpt turn")
        elif len(turns) == len(turns_raw) and any(t.role == "human" for t in turns):
            # every turn is trained on (multi-turn records), and chat templates need this order
            wrong = next((k for k, t in enumerate(turns) if t.role != ROLES[k % 2]), None)
            if wrong is not None:
                bad(
                    f"conversations[{wrong}]: expected '{ROLES[wrong % 2]}' "
                    "(turns alternate human, gpt, starting with human)"
                )
    image = raw.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        bad("'image' must be a non-empty path or s3:// URI")
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        bad("'system' must be a string")
    if problems:
        return None, problems
    extra = {k: v for k, v in raw.items() if k not in {"id", "image", "system", "conversations"}}
    return Record(str(rid), turns, image=image, system=system, extra=extra), []


def _read_raw(source: str) -> list[tuple[int, object]] | Problem:
    """(line, parsed JSON) pairs; a JSON list or JSONL, chosen by content."""
    try:
        text = read_bytes(source).decode("utf-8")
    except UnicodeDecodeError as err:
        return Problem(1, None, f"not UTF-8 text: {err}")
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as err:
            return Problem(err.lineno, None, f"invalid JSON: {err.msg}")
    rows: list[tuple[int, object]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                rows.append((n, Problem(n, None, f"invalid JSON: {err.msg}")))
    return rows


def load_dataset(source: str | os.PathLike, *, strict: bool = True, check_images: bool = True) -> Dataset:
    """Load and validate a dataset file (local path or ``s3://`` URI).

    Every record is checked (fields, duplicate ids, and with ``check_images`` that its image exists
    and decodes). ``strict=True`` raises :class:`DatasetError` listing all problems; ``strict=False``
    skips bad records and keeps the list in ``Dataset.problems``.
    """
    source = str(source)
    root = source.rsplit("/", 1)[0] if is_s3(source) else str(Path(source).resolve().parent)
    parsed = _read_raw(source)
    if isinstance(parsed, Problem):
        raise DatasetError(source, [parsed])
    dataset = Dataset([], root=root)
    problems: list[Problem] = []
    seen: set[str] = set()
    for line, raw in parsed:
        if isinstance(raw, Problem):
            problems.append(raw)
            continue
        record, errs = _parse_record(raw, line)
        rid = str(raw["id"]) if isinstance(raw, dict) and raw.get("id") is not None else None
        if rid is not None and rid in seen:
            errs = [Problem(line, rid, "duplicate id")]
        seen.add(rid)
        if record is not None and not errs and check_images and record.image is not None:
            errs = [Problem(line, record.id, reason)] if (reason := _image_problem(dataset, record)) else []
        if errs:
            problems.extend(errs)
            continue
        dataset.records.append(record)
    if problems and strict:
        raise DatasetError(source, problems)
    dataset.problems = problems
    return dataset


def _image_problem(dataset: Dataset, record: Record) -> str | None:
    """Why the record's image cannot be used, or None."""
    uri = dataset.image_uri(record)
    try:
        data = read_bytes(uri)
    except MissingObjectError:
        return f"missing image {uri}"
    except StorageError as err:
        if is_s3(uri):
            raise  # credentials, access or the endpoint: the other images would fail the same way, slowly
        return f"unreadable image {uri}: {err}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except (OSError, SyntaxError, ValueError) as err:
        return f"unreadable image {uri}: {err}"
    return None


def save_dataset(dataset: Dataset, path: str | os.PathLike, *, image_dir: str | None = None) -> Path | str:
    """Write ``dataset`` as a JSON list at ``path`` (a local file or an ``s3://`` key), atomically.

    Images held in memory (``Record.pixels``) are written as PNG under ``image_dir`` next to the file
    (default ``<file stem>_images``), named by record id and content hash, so neither a poisoned copy
    saved beside the clean file nor a failed re-save ever changes an image a published file uses;
    images already stored are referenced by a path relative to the new file when both are local, else
    by their absolute path or URI. The JSON file is published last, so a crash never leaves a dataset
    that points at missing images.
    """
    remote = is_s3(path)
    path = str(path) if remote else Path(path).resolve()
    parent = str(path).rsplit("/", 1)[0] if remote else path.parent
    stem = Path(str(path).rsplit("/", 1)[-1]).stem
    image_dir = image_dir or f"{stem}_images"
    out_records = []
    for record in dataset.records:
        rec = replace(record, pixels=None)
        if record.pixels is not None:
            buf = io.BytesIO()
            record.pixels.convert("RGB").save(buf, format="PNG")
            digest = hashlib.sha1(buf.getvalue()).hexdigest()[:12]
            rel = f"{image_dir}/{_safe_name(record.id)}-{digest}.png"
            target = join(parent, rel)
            if not exists(target):
                write_bytes(target, buf.getvalue())
            rec.image = rel
        elif record.image is not None:
            uri = dataset.image_uri(record)
            rec.image = uri if is_s3(uri) or remote else os.path.relpath(uri, parent)
        out_records.append(rec.to_json())
    if remote:
        write_bytes(path, (json.dumps(out_records, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    else:
        with atomic_write(path, "w") as handle:
            json.dump(out_records, handle, indent=1, ensure_ascii=False)
            handle.write("\n")
    return path


def _safe_name(record_id: str) -> str:
    """A file name for ``record_id``; a hash suffix keeps ids such as 'a/b' and 'a_b' apart."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in record_id)
    if safe == record_id:
        return safe
    return f"{safe}-{hashlib.sha1(record_id.encode()).hexdigest()[:8]}"
