"""A model repository: several models with versions, loaded on demand, reloaded as their files change. No torch.

Layout of the folder (``SEGSERVE_MODELS``, ``--models``)::

    DIR/NAME/VERSION/model.onnx    VERSION a whole number; model-int8.onnx beside it is its int8 variant
    DIR/NAME.onnx                  version 1 of NAME (NAME-int8.onnx beside it: its int8 variant)
    DIR/default.json               optional: {"model": "NAME"}, "NAME@VERSION" or a flat file name ("NAME.onnx")

A request names ``NAME`` (its newest good version) or ``NAME@VERSION``; with no name it gets the default: the
``default.json`` entry, else the newest version of the only model. Names are looked up among what a scan of the
folder found, never joined to a path: no client string reaches the file system, so ``../x``, absolute paths and
names of symlinks that lead out of the folder are simply unknown (a symlink whose target is outside the folder is
not listed at all).

**Reload** (polling, every ``SEGSERVE_MODELS_POLL`` seconds, 2 by default, on a background thread): a new or
changed ``model.onnx`` is taken once its size and modification time are the same on two scans in a row (a file
still being copied is not), and only after it loads and runs a tiny image; a file that fails is refused with its
reason logged once, and the previous version keeps serving. Copying with a rename into place is still the
recommended way (``cp model.onnx DIR/NAME/.tmp-3 && mv DIR/NAME/.tmp-3 DIR/NAME/3``). A newly accepted version of
a model that is in memory is loaded in the background and then swapped in; requests in flight finish on the
version they started with (they hold it). A removed version disappears on the next scan.

**Memory**: at most ``SEGSERVE_MAX_LOADED`` models are held (least recently used unloaded first); a request for a
model not in memory pays its load (an engine choice measured once and cached per file, then seconds at most).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segserve.modelcard import ModelFileError, ModelMetadata
from segserve.runtime.engines import probe
from segserve.runtime.segmenter import Segmenter, default_model_path
from segserve.settings import Settings

log = logging.getLogger("segserve.models")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SPEC = re.compile(rf"(?P<name>{NAME.pattern})(?:@(?P<version>[0-9]{{1,9}}))?")
FILE = "model.onnx"


class UnknownModel(LookupError):
    """No such model or version; the message names what exists."""


@dataclass(frozen=True)
class ModelVersion:
    """One version of one model: where its file is and the state of that file when it was found."""

    name: str
    version: int
    path: Path
    stamp: tuple[int, int]  # (size, mtime_ns)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


Loader = Callable[[ModelVersion], Segmenter]


def scan(root: Path) -> dict[str, dict[int, ModelVersion]]:
    """Every model version the folder holds (module docs), nothing outside it."""
    base = root.resolve()
    found: dict[str, dict[int, ModelVersion]] = {}

    def add(name: str, version: int, path: Path) -> None:
        try:
            resolved = path.resolve(strict=True)
            info = resolved.stat()
        except OSError:
            return
        if not resolved.is_relative_to(base) or not resolved.is_file():
            return
        found.setdefault(name, {})[version] = ModelVersion(name, version, path, (info.st_size, info.st_mtime_ns))

    try:
        entries = sorted(root.iterdir())
    except OSError:
        return found
    flat = {entry.name for entry in entries if entry.suffix == ".onnx"}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.suffix == ".onnx" and NAME.fullmatch(entry.stem):
            sibling_of = entry.stem.removesuffix("-int8") + ".onnx"
            if entry.stem.endswith("-int8") and sibling_of in flat:
                continue  # the int8 variant of NAME.onnx, not a model of its own
            add(entry.stem, 1, entry)
        elif NAME.fullmatch(entry.name) and entry.is_dir() and entry.resolve().is_relative_to(base):
            for version in entry.iterdir():
                if version.name.isdigit() and len(version.name) <= 9:
                    add(entry.name, int(version.name), version / FILE)
    return found


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@VERSION`` -> (name, version or None); anything else is an unknown model."""
    match = SPEC.fullmatch(spec.strip())
    if not match:
        raise UnknownModel(f"unknown model {spec[:60]!r}: name a model as NAME or NAME@VERSION")
    version = match.group("version")
    return match.group("name"), int(version) if version else None


class ModelRepository:
    """The models of a folder, or of one fixed file (``single``), for the service and the batch command."""

    def __init__(self, root: Path | None, load: Loader, *, max_loaded: int = 3, poll_seconds: float = 2.0,
                 single: Path | None = None) -> None:  # fmt: skip
        if (root is None) == (single is None):
            raise ValueError("give a repository folder or a single model file")
        self.root, self._load, self.max_loaded, self.poll_seconds = root, load, max_loaded, poll_seconds
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Lock] = {}
        self._resident: OrderedDict[str, tuple[ModelVersion, Segmenter]] = OrderedDict()
        self._refused: dict[tuple[Path, tuple[int, int]], str] = {}
        self._seen: dict[Path, tuple[int, int]] = {}
        self._cards: dict[ModelVersion, ModelMetadata] = {}
        self._versions: dict[str, dict[int, ModelVersion]] = {}
        if single is not None:
            info = single.stat() if single.is_file() else None
            if info is None:
                raise ModelFileError(f"{single}: model file does not exist")
            entry = ModelVersion(single.stem, 1, single, (info.st_size, info.st_mtime_ns))
            self._cards[entry] = _check(entry)
            self._versions = {entry.name: {1: entry}}
            self._default_spec: str | None = entry.name
        else:
            if not root.is_dir():
                raise ModelFileError(f"{root}: model repository folder does not exist")
            self._versions = self._accepted(scan(root), first=True)
            self._default_spec = self._read_default()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- lookup ---------------------------------------------------------------------------------------------------
    def resolve(self, spec: str | None) -> ModelVersion:
        """The version a request for ``spec`` gets (module docs); UnknownModel names what exists."""
        with self._lock:
            if not spec:
                if self._default_spec is None:
                    raise UnknownModel(f"this service has several models and no default: name one ({self._known()})")
                spec = self._default_spec
            name, version = parse_spec(spec)
            versions = self._versions.get(name)
            if not versions:
                raise UnknownModel(f"unknown model {name[:60]!r}; models: {self._known()}")
            if version is None:
                return versions[max(versions)]
            if version not in versions:
                raise UnknownModel(
                    f"{name} has no version {version}; versions: {', '.join(map(str, sorted(versions)))}"
                )
            return versions[version]

    def get(self, spec: str | None) -> tuple[ModelVersion, Segmenter]:
        """The version for ``spec`` and its loaded segmenter (loaded now, once, if it is not in memory). A version
        that fails to load or run is refused and the request falls back to the version before it."""
        for _ in range(8):
            entry = self.resolve(spec)
            with self._lock:
                held = self._resident.get(entry.label)
                if held is not None and held[0] == entry:
                    self._resident.move_to_end(entry.label)
                    return held
                gate = self._loading.setdefault(entry.label, threading.Lock())
            with gate:  # one load per version, however many requests ask for it at once
                with self._lock:
                    held = self._resident.get(entry.label)
                    if held is not None and held[0] == entry:
                        return held
                try:
                    segmenter = self._load(entry)
                    probe(segmenter.engine)  # a file that loads but cannot run a tiny image is refused
                except Exception as error:  # the file cannot serve: refuse it, try the one before
                    self._refuse(entry, error)
                    continue
                return self._keep(entry, segmenter)
        raise UnknownModel(f"no version of {spec or 'the default model'} could be loaded")

    def _keep(self, entry: ModelVersion, segmenter: Segmenter) -> tuple[ModelVersion, Segmenter]:
        with self._lock:
            self._resident[entry.label] = (entry, segmenter)
            self._resident.move_to_end(entry.label)
            while len(self._resident) > self.max_loaded:
                label, _ = self._resident.popitem(last=False)
                log.info("unloaded %s (at most %d models in memory)", label, self.max_loaded)
            return entry, segmenter

    def has_default(self) -> bool:
        """Whether a request may leave the model unnamed (a default.json entry, or a single model)."""
        with self._lock:
            return self._default_spec is not None

    def listing(self) -> list[dict]:
        """Every model and version: its card's essentials, whether it is in memory and the engine it runs on."""
        with self._lock:
            versions = {name: dict(found) for name, found in self._versions.items()}
            resident = dict(self._resident)
            try:
                default = self.resolve(None).label
            except UnknownModel:
                default = None
        models = []
        for name in sorted(versions):
            rows = []
            for number in sorted(versions[name], reverse=True):
                entry = versions[name][number]
                held = resident.get(entry.label)
                row = {
                    "version": number,
                    "loaded": held is not None and held[0] == entry,
                    "default": entry.label == default,
                }
                row.update(_card(entry, self._cards.get(entry), held[1] if row["loaded"] else None))
                rows.append(row)
            models.append({"name": name, "newest": max(versions[name]), "versions": rows})
        return models

    def _known(self) -> str:
        return (
            ", ".join(
                f"{name} (versions {', '.join(map(str, sorted(v)))})" for name, v in sorted(self._versions.items())
            )
            or "none"
        )

    # -- reload ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Poll the folder in a background thread (a repository of one fixed file has nothing to watch)."""
        if self.root is None or self._watcher is not None:
            return
        self._watcher = threading.Thread(target=self._watch, name="segserve-models", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:  # a scan must never kill the watcher
                log.exception("model repository scan failed")

    def refresh(self) -> None:
        """One scan: settled new versions checked and taken, removed ones dropped. The new newest version of a
        model in memory is loaded here, before any request can resolve to it, so requests never wait for it."""
        assert self.root is not None
        accepted = self._accepted(scan(self.root), first=False)
        with self._lock:
            published = {name: dict(versions) for name, versions in self._versions.items()}
            resident_names = {entry.name for entry, _ in self._resident.values()}
        for name, versions in list(accepted.items()):
            newest = versions[max(versions)]
            if name not in resident_names or published.get(name, {}).get(newest.version) == newest:
                continue
            log.info("new version %s: loading it before it takes requests", newest.label)
            try:
                segmenter = self._load(newest)
                probe(segmenter.engine)  # a file that loads but cannot run a tiny image is refused
            except Exception as error:  # refused: the version before keeps serving
                self._refuse(newest, error)
                del versions[newest.version]
                if not versions:
                    del accepted[name]
                continue
            self._keep(newest, segmenter)
        with self._lock:
            self._versions = accepted
            self._default_spec = self._read_default()
            for label in [label for label, (entry, _) in self._resident.items() if not self._current(entry)]:
                del self._resident[label]

    def _current(self, entry: ModelVersion) -> bool:
        return self._versions.get(entry.name, {}).get(entry.version) == entry

    def _accepted(self, found: dict[str, dict[int, ModelVersion]], first: bool) -> dict[str, dict[int, ModelVersion]]:
        """The versions of ``found`` that may serve: settled (same file state as on the previous scan, or present
        at start-up), not refused before, and (when new) loadable with metadata."""
        accepted: dict[str, dict[int, ModelVersion]] = {}
        seen: dict[Path, tuple[int, int]] = {}
        known = {entry.path: entry for versions in self._versions.values() for entry in versions.values()}
        for name, versions in found.items():
            for number, entry in versions.items():
                seen[entry.path] = entry.stamp
                if (entry.path, entry.stamp) in self._refused:
                    continue
                if known.get(entry.path) == entry:
                    accepted.setdefault(name, {})[number] = entry
                    continue
                if not first and self._seen.get(entry.path) != entry.stamp:
                    continue  # new or still changing: wait for the next scan
                try:
                    self._cards[entry] = _check(entry)
                except Exception as error:  # any failure means the file cannot serve
                    self._refuse(entry, error)
                    continue
                if not first:
                    log.info("found %s (%s)", entry.label, entry.path)
                accepted.setdefault(name, {})[number] = entry
        self._seen = seen
        return accepted

    def _refuse(self, entry: ModelVersion, error: BaseException) -> None:
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        if (entry.path, entry.stamp) not in self._refused:
            log.warning("refused %s (%s): %s; the previous version keeps serving", entry.label, entry.path, reason)
        self._refused[(entry.path, entry.stamp)] = reason
        with self._lock:
            versions = self._versions.get(entry.name, {})
            if versions.get(entry.version) == entry:
                del versions[entry.version]
                if not versions:
                    del self._versions[entry.name]

    def _read_default(self) -> str | None:
        """The default.json entry (a name, NAME@VERSION or a flat file name), else the only model's name."""
        assert self.root is not None
        pointer = self.root / "default.json"
        if pointer.is_file():
            try:
                named = str(json.loads(pointer.read_text())["model"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("%s is unreadable (%s); no default model from it", pointer, error)
            else:
                return named.removesuffix(".onnx")
        return next(iter(self._versions)) if len(self._versions) == 1 else None


def _check(entry: ModelVersion) -> ModelMetadata:
    """A new file must be a model segserve can load: onnxruntime opens it and its metadata parses."""
    from segserve.runtime.session import load_model

    return load_model(entry.path, providers=["CPUExecutionProvider"]).metadata


def _card(entry: ModelVersion, metadata: ModelMetadata | None, segmenter: Segmenter | None) -> dict:
    """What ``GET /models`` says about one version (from the metadata read when the file was accepted)."""
    metadata = segmenter.metadata if segmenter is not None else metadata
    if metadata is None:
        return {}
    card = {
        "file": entry.path.name, "classes": list(metadata.classes), "backbone": metadata.backbone,
        "variant": metadata.variant, "image_size": metadata.image_size, "validation": metadata.validation,
    }  # fmt: skip
    if segmenter is not None:
        card["engine"] = segmenter.choice.candidate.label
    return card


def open_repository(settings: Settings) -> ModelRepository:
    """The repository of ``SEGSERVE_MODELS``, else one of the single model ``SEGSERVE_MODEL`` (or the shipped
    default): the service and the batch command serve either the same way."""

    def load(entry: ModelVersion) -> Segmenter:
        return Segmenter(entry.path, settings=settings)

    if settings.models is not None:
        return ModelRepository(settings.models, load, max_loaded=settings.max_loaded,
                               poll_seconds=settings.models_poll)  # fmt: skip
    return ModelRepository(None, load, max_loaded=settings.max_loaded, single=default_model_path(settings))
