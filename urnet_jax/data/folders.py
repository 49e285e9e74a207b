"""Class-per-folder image sets: which folders make which class, and which files are candidates.

`config.data.class_map` is one of
- "wbc3": the paper's three classes from the paper's or the PBC folder names,
  granulocyte <- granulocyte | neutrophil | eosinophil | basophil, monocyte <- monocyte,
  lymphocyte <- lymphocyte (each class needs at least one of its folders);
- "folders": every non-hidden subfolder holding at least one image file is its own class
  (classes sorted by name, case-insensitively);
- a dict {class: folder or [folders]}: every named folder must exist; the classes keep the dict's
  order (a ConfigDict, unlike a dict, sorts its keys).
Folder names match case-insensitively. Class folders are searched recursively; hidden files and
folders, and files without an image extension, are ignored.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence

from urnet_jax.data.images import is_image_name
from urnet_jax.errors import DataError

WBC3: dict[str, tuple[str, ...]] = {
    "granulocyte": ("granulocyte", "neutrophil", "eosinophil", "basophil"),
    "monocyte": ("monocyte",),
    "lymphocyte": ("lymphocyte",),
}


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One candidate image: absolute path, its output class, and the source folder (relative to root)."""

    path: pathlib.Path
    class_name: str
    source_folder: str


def _visible_subfolders(root: pathlib.Path) -> dict[str, list[str]]:
    """Lower-cased name -> actual names of the non-hidden subfolders of root."""
    folders: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            folders.setdefault(entry.name.lower(), []).append(entry.name)
    return folders


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """Image-named, non-hidden files under folder (recursive, hidden folders skipped), sorted."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(pathlib.Path(directory, name) for name in files if is_image_name(name))
    return sorted(found)


def _folder_names(value: str | Sequence[str], class_name: str) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise DataError(f"class_map: class '{class_name}' must map to a folder name or a list of folder names")
    return names


def resolve_class_folders(root: str | os.PathLike, class_map: str | Mapping) -> dict[str, tuple[str, ...]]:
    """class name -> the actual names of its folders under root (in class order).

    Raises DataError for a missing root, a class_map naming a missing folder, a folder used by two
    classes, an unknown class_map, or fewer than two classes.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    subfolders = _visible_subfolders(root)
    classes: dict[str, tuple[str, ...]] = {}
    if class_map == "folders":
        names = sorted((n for group in subfolders.values() for n in group), key=lambda n: (n.lower(), n))
        classes = {name: (name,) for name in names if _image_files(root / name)}
    elif class_map == "wbc3":
        for class_name, candidates in WBC3.items():
            found = tuple(actual for name in candidates for actual in subfolders.get(name, ()))
            if not found:
                raise DataError(f"class_map 'wbc3': class '{class_name}' needs one of the folders "
                                f"{'|'.join(candidates)} in {root}, found none")
            classes[class_name] = found
    elif isinstance(class_map, Mapping):
        owner: dict[str, str] = {}
        for class_name, value in class_map.items():
            found = []
            for name in _folder_names(value, class_name):
                matches = subfolders.get(name.lower())
                if not matches:
                    raise DataError(f"class_map: folder '{name}' of class '{class_name}' not found in {root}")
                if name.lower() in owner and owner[name.lower()] != class_name:
                    raise DataError(f"class_map: folder '{name}' is mapped to both "
                                    f"'{owner[name.lower()]}' and '{class_name}'")
                owner[name.lower()] = class_name
                found.extend(matches)
            classes[str(class_name)] = tuple(dict.fromkeys(found))
    else:
        raise DataError(f"class_map must be 'wbc3', 'folders' or a dict class -> folders, got {class_map!r}")
    if len(classes) < 2:
        raise DataError(f"need at least two classes, found {len(classes)} in {root} with class_map {class_map!r}")
    return classes


def scan_class_files(root: str | os.PathLike, class_folders: Mapping[str, Sequence[str]]) -> list[SourceFile]:
    """Every candidate image file of every class, in class order then path order."""
    root = pathlib.Path(root).resolve()
    return [SourceFile(path=path, class_name=class_name, source_folder=folder)
            for class_name, folders in class_folders.items()
            for folder in folders
            for path in _image_files(root / folder)]
