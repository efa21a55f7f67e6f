"""The run folder `{output}/{name}/`: recipe.yaml, metrics.csv, checkpoints/, reports."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dltrain.config.schema import Recipe, to_yaml
from dltrain.errors import UserError
from dltrain.runs.checkpoint import save_checkpoint
from dltrain.runs.metrics_csv import metrics_csv
from dltrain.runs.transaction import recover, transaction
from dltrain.system.atomic import atomic_write, atomic_write_text


class RunFolder:
    """Paths of one run and the writes into it; every write is atomic."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.last_path = self.checkpoints / "last.pt"
        self.best_path = self.checkpoints / "best.pt"
        self.recipe_path = self.root / "recipe.yaml"
        self.metrics_path = self.root / "metrics.csv"
        self.replacing: Path | None = None  # --force: the old run, set aside until a save

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> RunFolder:
        return cls(Path(recipe.output) / recipe.name)

    def holds_a_run(self) -> bool:
        """Whether a training run was started here (its recipe and checkpoints folder)."""
        return self.recipe_path.is_file() and self.checkpoints.is_dir()

    def unfinished(self) -> bool:
        """A run that saved progress (last.pt) but never wrote its final report."""
        return self.last_path.is_file() and not (self.root / "report.json").is_file()

    def same_recipe(self, recipe: Recipe) -> bool:
        """Whether the folder's recipe.yaml is this resolved recipe."""
        try:
            return self.recipe_path.read_text(encoding="utf-8") == to_yaml(recipe)
        except OSError:
            return False

    def holds_nothing_of_another(self, recipe: Recipe) -> bool:
        """No run here, or only this recipe's start with nothing saved: a new run may use it."""
        if not self.recipe_path.exists():
            return not (self.root / "report.json").exists()
        saved = self.last_path.exists() or (self.root / "report.json").exists()
        return not saved and self.same_recipe(recipe)

    def check_free_for(self, recipe: Recipe, force: bool, resuming: bool) -> None:
        """Refuse to mix two different runs in one folder, unless --force or --resume."""
        if force or resuming or not self.recipe_path.exists():
            return
        if self.recipe_path.read_text(encoding="utf-8") != to_yaml(recipe):
            raise UserError(
                f"{self.root} already holds a run of a different recipe. Use another name "
                f"(name=... or output=...), --resume auto to continue it, or --force to replace it."
            )

    def ensure_writable(self) -> None:
        """Refuse (exit 2) a run folder that cannot be created or written, before any work.

        Creates the folder and a probe file in it, then removes what it created, so a run that
        fails later (e.g. on a missing data file) leaves no empty folder behind.
        """
        created = [p for p in (self.root, *self.root.parents) if not p.exists()]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            blocker = next((p for p in (self.root, *self.root.parents) if p.is_file()), None)
            reason = f"{blocker} is a file, not a folder" if blocker else exc.strerror or exc
            raise UserError(
                f"cannot write the run folder {self.root}: {reason}. Set output=... to a folder "
                "you can write to (or fix its permissions)."
            ) from None
        finally:
            for path in created:  # deepest first
                with contextlib.suppress(OSError):
                    path.rmdir()

    def start(self, recipe: Recipe) -> None:
        """Create the folder and write the resolved recipe."""
        atomic_write_text(self.recipe_path, to_yaml(recipe))

    def recover(self) -> None:
        """Finish or undo a save that a crash cut short (see transaction.py)."""
        recover(self.root)

    def save_epoch(
        self, history: list[dict[str, Any]], state: dict[str, Any], improved: bool
    ) -> None:
        """An epoch's end as one transaction: metrics.csv, last.pt and (when the monitored
        metric improved) best.pt are all replaced, or none is."""
        with transaction(self.root) as tx:
            last = tx.staged(self.last_path)
            save_checkpoint(last, state)
            if improved:  # the same state: its bytes, not a second serialisation and digest
                best = last.read_bytes()
                atomic_write(tx.staged(self.best_path), lambda f: f.write(best), len(best))
            atomic_write_text(tx.staged(self.metrics_path), metrics_csv(history))
        self._drop_replaced()

    def save_last(self, state: dict[str, Any]) -> None:
        """A mid-epoch save: last.pt alone (metrics.csv and best.pt change at epoch ends)."""
        save_checkpoint(self.last_path, state)
        self._drop_replaced()

    def _drop_replaced(self) -> None:
        """--force: the new run saved progress, so the run it replaces goes now (its disk
        space back at the first checkpoint, not at the end of the new run)."""
        if self.replacing is not None:
            shutil.rmtree(self.replacing, ignore_errors=True)
            self.replacing = None

    def set_aside(self) -> Path | None:
        """--force: move the run folder aside (to .NAME.replaced) so that the new run starts
        in an empty folder; `settle_replacement` decides its fate when the new run ends."""
        if not self.root.exists():
            return None
        aside = self.root.with_name(f".{self.root.name}.replaced")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(self.root, aside)
        self.replacing = aside
        return aside

    def settle_replacement(self, aside: Path) -> None:
        """After a --force run: the replaced run is deleted once the new one has saved
        progress; a new run that saved nothing gives the folder back to the replaced one."""
        self.replacing = None
        if self.last_path.is_file():
            shutil.rmtree(aside, ignore_errors=True)  # gone already unless another process saved
            return
        shutil.rmtree(self.root, ignore_errors=True)
        os.replace(aside, self.root)


class UnfinishedRun(UserError):
    """A run folder holds an unfinished run of the recipe: starting over would lose it."""

    def __init__(self, run: RunFolder, resume_command: str = "dltrain fit ... --resume auto"):
        super().__init__(
            f"{run.root} holds an unfinished run of this recipe ({run.last_path} is saved, no "
            f"report yet); starting over would overwrite it. Continue it: {resume_command} — "
            "or replace it with --force."
        )
        self.run = run


# How many numbers past the highest version a new run tries (names taken by files, or held by
# other processes) before saying no folder is free
MAX_SKIPPED_VERSIONS = 100


def _what_holds(held: RunFolder, recipe: Recipe, taken: Callable[[Path], bool]) -> str:
    """Why a new run does not go to `held`, as the note says it."""
    if taken(held.root):  # another fit of any recipe (it may not have written its recipe yet)
        return "is in use by another fit"
    if not held.root.is_dir():
        return "is a file, not a run folder"
    return "holds a finished run" if held.same_recipe(recipe) else "holds a run of another recipe"


def versions(base: Path) -> list[tuple[int, Path]]:
    """The run folders of one name that exist, oldest first: (1, base), (2, base-2), ..."""
    base = Path(base)
    found = [(1, base)] if base.is_dir() else []
    numbered = re.compile(re.escape(base.name) + r"-([1-9][0-9]*)")
    if base.parent.is_dir():
        for path in base.parent.iterdir():
            match = numbered.fullmatch(path.name)
            if match and int(match[1]) >= 2 and path.is_dir():
                found.append((int(match[1]), path))
    return sorted(found)


def version_path(base: Path, number: int) -> Path:
    return Path(base) if number == 1 else Path(base).with_name(f"{Path(base).name}-{number}")


def choose_version(
    base: Path, recipe: Recipe, taken: Callable[[Path], bool]
) -> tuple[RunFolder, str | None]:
    """Where a new run of `recipe` goes: `base` when it holds no run, else the first of
    base-2, base-3, ... that holds none (or only this recipe's start, with nothing saved), else
    the next number; with a note saying why when it is not `base`. `taken(path)`: another
    process writes there.

    The newest version holding an unfinished run of this recipe is refused (UnfinishedRun):
    it is to be continued with --resume auto, or replaced with --force.
    """
    existing = versions(base)
    for _, path in reversed(existing):
        newest = RunFolder(path)
        if newest.holds_a_run() and not taken(path):
            if newest.unfinished() and newest.same_recipe(recipe):
                raise UnfinishedRun(newest)
            break
    numbers = sorted({1, *(number for number, _ in existing)})
    after = range(numbers[-1] + 1, numbers[-1] + 1 + MAX_SKIPPED_VERSIONS)
    for number in [*numbers, *after]:
        run = RunFolder(version_path(base, number))
        if run.root.exists() and not run.root.is_dir():
            continue  # a file of that name is no run folder, and not ours to replace
        if not taken(run.root) and run.holds_nothing_of_another(recipe):
            if number == 1:
                return run, None
            why = _what_holds(RunFolder(base), recipe, taken)
            return run, f"{base} {why}: this run goes to {run.root}"
    raise UserError(
        f"no folder for a new run of {base.name} is free in {base.parent} (up to "
        f"{version_path(base, after[-1]).name}, each held, in use or not a folder). Choose "
        "another output folder (output=...) or name (name=...)."
    )
