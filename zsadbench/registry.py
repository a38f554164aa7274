"""Registries of methods and datasets, filled by decorators and by third-party entry points.

Built-in plugins register with one decorator next to their definition (``@register_method("winclip")``,
``@register_dataset("mvtec", ...)``). A third-party package adds an entry point in the group ``zsadbench.methods``
or ``zsadbench.datasets`` whose object is a :class:`~zsadbench.detector.Detector` subclass or a dataset loader
(a callable ``(root, **options) -> Dataset``, optionally already wrapped by :func:`register_dataset`):

    [project.entry-points."zsadbench.methods"]
    mymethod = "my_package.detector:MyDetector"
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zsadbench.types import Dataset

if TYPE_CHECKING:
    from zsadbench.detector import Detector

log = logging.getLogger(__name__)

METHOD_GROUP = "zsadbench.methods"
DATASET_GROUP = "zsadbench.datasets"

_methods: dict[str, type[Detector]] = {}
_datasets: dict[str, DatasetInfo] = {}
_discovered = False


@dataclass(frozen=True)
class Archive:
    """One published archive of a dataset: where it is, its SHA-256 and where that hash was published."""

    url: str
    sha256: str | None  # None: no published hash; the download then records the one it computed
    sha256_source: str  # where the hash comes from (e.g. "openvinotoolkit/anomalib ...@commit"), or why there is none
    filename: str = ""  # the name to save it under, when the URL does not end in it
    mirrors: tuple[str, ...] = ()  # other URLs serving the same bytes, tried in order when ``url`` fails
    extract_to: str = ""  # sub-folder of the dataset root it unpacks into ("" = the root itself)

    @property
    def name(self) -> str:
        """Returns the archive's file name."""
        return self.filename or self.url.rstrip("/").rsplit("/", 1)[-1]


# Known image counts: category (or "total") -> split/kind ("train", "test_normal", "test_anomalous", ...) -> count.
Counts = Mapping[str, Mapping[str, int]]


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset: its loader and what users need to know to obtain it and point it at their copy."""

    name: str
    loader: Callable[..., Dataset]
    domain: str = "industrial"
    description: str = ""
    layout: str = ""  # the expected folder layout, quoted in errors about a wrong data root
    needs_root: bool = True
    license: str = "not stated"
    homepage: str = ""
    obtain: str = ""  # how to get it by hand (gated or manual datasets: the exact steps)
    archives: tuple[Archive, ...] = ()  # public direct downloads (`zsadbench download`)
    categories: tuple[str, ...] = ()  # as distributed, when known
    counts: Counts = field(default_factory=dict)
    counts_source: str = ""  # where the known counts come from

    def check_options(self, options: dict[str, Any]) -> None:
        """Raises a ValueError naming any option the loader does not take (before anything is read or generated)."""
        parameters = inspect.signature(self.loader).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return
        accepted = [name for name, p in list(parameters.items())[1:]  # the first is the root folder
                    if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        unknown = [key for key in options if key not in accepted]
        if unknown:
            raise ValueError(f"dataset {self.name!r} has no option {', '.join(map(repr, unknown))} "
                             f"(--dataset-option); its options: {', '.join(accepted) or 'none'}")

    def load(self, root: str | Path | None, **options: Any) -> Dataset:
        """Returns the dataset read from ``root``."""
        if self.needs_root and root is None:
            raise ValueError(f"dataset {self.name!r} needs --data-root pointing at its folder; expected layout:\n"
                             f"{self.layout}")
        return self.loader(None if root is None else Path(root).expanduser(), **options)

    @property
    def downloadable(self) -> bool:
        """Returns whether `zsadbench download` fetches it (else it prints the steps to obtain it)."""
        return bool(self.archives)


def register_method(name: str) -> Callable[[type[Detector]], type[Detector]]:
    """Returns a class decorator that registers a Detector subclass under ``name``."""

    def wrap(cls: type[Detector]) -> type[Detector]:
        if name in _methods and _methods[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_methods[name].__module__}")
        cls.name = name
        _methods[name] = cls
        return cls

    return wrap


def register_dataset(name: str, *, domain: str = "industrial", description: str = "", layout: str = "",
                     needs_root: bool = True, license: str = "not stated", homepage: str = "", obtain: str = "",
                     archives: tuple[Archive, ...] = (), categories: tuple[str, ...] = (),
                     counts: Counts | None = None,
                     counts_source: str = "") -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Returns a decorator that registers a loader ``(root, **options) -> Dataset`` under ``name``, with the
    dataset's metadata (license, how to obtain it, published archives and hashes, known counts)."""

    def wrap(loader: Callable[..., Dataset]) -> Callable[..., Dataset]:
        info = DatasetInfo(name, loader, domain, description or (loader.__doc__ or "").strip().splitlines()[0],
                           layout, needs_root, license, homepage, obtain, tuple(archives), tuple(categories),
                           dict(counts or {}), counts_source)
        if name in _datasets and _datasets[name].loader is not loader:
            raise ValueError(f"dataset {name!r} is already registered by {_datasets[name].loader.__module__}")
        _datasets[name] = info
        loader.dataset_info = info  # type: ignore[attr-defined]
        return loader

    return wrap


def _discover() -> None:
    """Imports the built-in plugins and loads third-party entry points (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    importlib.import_module("zsadbench.methods")
    importlib.import_module("zsadbench.datasets")
    for ep in entry_points(group=METHOD_GROUP):
        if ep.name in _methods:
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not take the built-ins down with it
            log.warning("could not load method plugin %r (%s): %s", ep.name, ep.value, exc)
            continue
        register_method(ep.name)(obj)
    for ep in entry_points(group=DATASET_GROUP):
        if ep.name in _datasets:
            continue
        try:
            obj = ep.load()
        except Exception as exc:
            log.warning("could not load dataset plugin %r (%s): %s", ep.name, ep.value, exc)
            continue
        info = getattr(obj, "dataset_info", None)
        if info is not None and info.name != ep.name:
            info = replace(info, name=ep.name)
        _datasets[ep.name] = info or DatasetInfo(ep.name, obj, description=(obj.__doc__ or "").strip())


def get_method(name: str) -> type[Detector]:
    """Returns the Detector class registered as ``name``."""
    _discover()
    try:
        return _methods[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(_methods)) or 'none'}") from None


def get_dataset(name: str) -> DatasetInfo:
    """Returns the registration of dataset ``name``."""
    _discover()
    try:
        return _datasets[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; registered: {', '.join(sorted(_datasets)) or 'none'}") from None


def list_methods() -> dict[str, type[Detector]]:
    """Returns every registered method, by name."""
    _discover()
    return dict(sorted(_methods.items()))


def list_datasets() -> dict[str, DatasetInfo]:
    """Returns every registered dataset, by name."""
    _discover()
    return dict(sorted(_datasets.items()))
