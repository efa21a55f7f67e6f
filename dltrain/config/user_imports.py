"""The user's own component modules (`imports:`): the only code a recipe runs, imported by
name or file so their components register, and the same for a checkpoint's recipe (named
again by the user, never taken from the file)."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from dltrain.config.schema import COMPONENT_SECTIONS
from dltrain.errors import RecipeError, UserError

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def import_user_modules(raw: dict[str, Any], base_dir: Path | None = None) -> dict[str, Any]:
    """Import the modules a recipe lists under `imports:`, so their components register.

    This is the only way a recipe runs code, and only modules the user names here. An entry
    ending in `.py` is a file, relative to `base_dir` (default: the current folder); it is
    returned as an absolute path, so a checkpoint's recipe finds it again from anywhere. Other
    entries are dotted module names, found on the Python path or else in `base_dir`.
    Importing again is a no-op. Returns `raw` with the entries so normalised.
    """
    if "imports" not in raw:
        return raw
    entries = raw["imports"]
    if entries is None:  # `imports: null` (or the override imports=null): nothing to import
        return {**raw, "imports": []}
    if not isinstance(entries, list):
        raise RecipeError(
            "imports",
            f"must be a list of module names or .py files (got {entries!r}), e.g. "
            "[my_pkg.models, ./my_models.py].",
        )
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    normalised = []
    for i, entry in enumerate(entries):
        where = f"imports[{i}]"
        if isinstance(entry, str) and entry.strip().endswith(".py"):
            path = Path(entry.strip()).expanduser()
            path = (path if path.is_absolute() else base / path).resolve()
            _import_file(path, where)
            normalised.append(str(path))
        elif isinstance(entry, str) and _MODULE_NAME.match(entry):
            _import_module(entry, base, where)
            normalised.append(entry)
        else:
            raise RecipeError(
                where,
                f"{entry!r} is neither a dotted module name (my_pkg.models) nor a .py file "
                "(./my_models.py).",
            )
    return {**raw, "imports": normalised}


def import_for_checkpoint(
    saved: dict[str, Any],
    imports: list[str],
    source: str,
    needed: tuple[str, ...] = tuple(COMPONENT_SECTIONS),
) -> list[str]:
    """Import the modules the user names for a checkpoint (`--imports`), never the ones the
    checkpoint's recipe lists: a checkpoint is data, and whoever wrote it must not choose what
    code runs here. Returns the imports as normalised (absolute .py paths). A component of the
    `needed` sections that is still unknown is a UserError saying which modules to pass."""
    try:
        normalised = import_user_modules({"imports": list(imports)})["imports"]
    except RecipeError as exc:
        raise UserError(f"--imports: {exc.problem}") from exc.__cause__
    missing = _unknown_components(saved, needed)
    if missing:
        listed = saved.get("imports") if isinstance(saved.get("imports"), list) else []
        written_with = f" (the run that wrote it imported {', '.join(map(str, listed))})"
        example = listed[0] if listed else "my_components.py"
        raise UserError(
            f"{source} uses {', '.join(missing)}, which dltrain does not have"
            f"{written_with if listed else ''}. A checkpoint never runs code: name the module "
            f"yourself, e.g. --imports {example}."
        )
    return normalised


def _unknown_components(saved: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """'model my_net' for each section of a saved recipe naming an unregistered component."""
    from dltrain.config.registry import REGISTRIES

    unknown = []
    for section in sections:
        kind = COMPONENT_SECTIONS[section]
        body = saved.get(section)
        name = body.get("name") if isinstance(body, dict) else None
        if isinstance(name, str) and name not in REGISTRIES[kind]:
            unknown.append(f"{section} '{name}'")
    return unknown


def _import_module(name: str, base: Path, where: str) -> None:
    """Import a dotted module; `base` joins the end of sys.path for this import only, so it
    never shadows an installed module."""
    folder = str(base)
    added = folder not in sys.path
    if added:
        sys.path.append(folder)
    try:
        importlib.invalidate_caches()  # the module may have been written after startup
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise RecipeError(
                where,
                f"cannot import module '{name}': not found on the Python path nor in {base}. "
                "Check the name, install its package, or list a file instead (./my_models.py).",
            ) from None
        raise RecipeError(where, _import_failure(name, exc)) from exc
    except (Exception, SystemExit) as exc:  # whatever the user's module raises
        raise RecipeError(where, _import_failure(name, exc)) from exc
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _import_file(path: Path, where: str) -> None:
    """Import a .py file as the module named by its stem, its folder on sys.path meanwhile (as
    for a script) so it can import its neighbours."""
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
        if origin and Path(origin).resolve() == path:
            return  # imported already (a module registers its components once)
        raise RecipeError(
            where,
            f"cannot import {path} as module '{name}': a module of that name is already "
            f"loaded (from {origin or 'Python itself'}). Rename the file.",
        )
    if not path.is_file():
        raise RecipeError(
            where,
            f"file not found: {path}. Relative .py paths start at the recipe's folder.",
        )
    if not name.isidentifier():
        raise RecipeError(
            where, f"'{path.name}' cannot be a module name: use letters, digits and '_'."
        )
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `import name` would, so its neighbours can import it too
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise RecipeError(where, _import_failure(str(path), exc)) from exc
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _import_failure(what: str, exc: BaseException) -> str:
    """'importing X raised Error: message (file.py:12). Fix ...' for an import that failed."""
    if isinstance(exc, SyntaxError) and exc.filename:
        at = f"{exc.filename}:{exc.lineno}"
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        at = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
    return (
        f"importing '{what}' raised {reason}{f' (at {at})' if at else ''}. Fix that module "
        "(DLTRAIN_DEBUG=1 shows the traceback) or remove it from imports."
    )
