"""One base for the step configs (fine-tune, profile, filter, evaluation, gate), in the style of peft.

Each config is a dataclass that validates itself in ``__post_init__``. :class:`StepConfig` adds the
JSON round trip: ``from_dict`` refuses unknown keys (a typo must not pass silently), and
``save_pretrained``/``from_pretrained`` write one JSON file that records the config type and the
tcapguard version that wrote it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Self

from tcapguard import __version__


class StepConfig:
    """Mixin for dataclass configs: dict and JSON round trips with unknown keys rejected."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """A config from JSON-style settings; unknown keys are an error naming them."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names) - {"config_type", "tcapguard_version"})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid: {names}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``path`` (a .json file, or a directory that gets ``<ConfigType>.json``)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / f"{type(self).__name__}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"config_type": type(self).__name__, "tcapguard_version": __version__, **self.to_dict()}
        path.write_text(json.dumps(body, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Self:
        path = Path(path)
        if path.is_dir():
            path = path / f"{cls.__name__}.json"
        data = json.loads(path.read_text())
        written = data.get("config_type", cls.__name__)
        if written != cls.__name__:
            raise ValueError(f"{path} holds a {written}, not a {cls.__name__}")
        return cls.from_dict(data)
