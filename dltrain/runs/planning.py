"""The checks before a fit does any work: load the recipe, choose its run folder (a new
numbered version, the one to resume, or {name} itself with --force), hold that folder's lock,
and refuse (exit 2) what would lose work or cannot be written. Used alike by a single run and
by the `fit --nproc` launcher before it starts the processes (which then use the folder it chose,
RUN_DIR_VARIABLE)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from dltrain.config.loading import load_recipe
from dltrain.config.schema import Recipe
from dltrain.data.paths import check_input_paths
from dltrain.runs.folder import RunFolder, UnfinishedRun, choose_version, versions
from dltrain.runs.lock import RunInUse, holding, in_use
from dltrain.system.distributed import world_from_environment

RUN_DIR_VARIABLE = "DLTRAIN_RUN_DIR"  # the run folder fit --nproc chose for its processes


@dataclass
class RunPlan:
    """A checked recipe, its run folder and the checkpoint to resume from (if any)."""

    recipe: Recipe
    run: RunFolder
    checkpoint: Path | None


@contextlib.contextmanager
def planned_run(
    recipe_path: Path,
    overrides: list[str],
    resume: str | None,
    force: bool,
    console: Console | None,
    resume_command: str,
    check: bool = True,
    lock: bool = True,
) -> Iterator[RunPlan]:
    """The checks before any work, under the run folder's lock when `lock` (held until the
    block ends): load the recipe, choose the run folder and what to resume, and refuse (exit 2)
    what would lose work or cannot be written.

    A new run goes to {output}/{name}, or to the next {name}-N when that holds another run
    (`choose_version`); --resume continues a version of the name (auto: the newest with a
    last.pt); --force replaces {name}. Processes started by `fit --nproc` use the folder their
    launcher chose; under torchrun started by hand (no launcher to choose for all processes)
    the folder is {name} itself, refused when it holds a different run.
    """

    recipe = load_recipe(recipe_path, overrides)
    check_input_paths(recipe.data.dataset_args)  # input problems first, then the run folder
    chosen = os.environ.get(RUN_DIR_VARIABLE) or _moved_run(recipe_path, recipe, resume)
    base = RunFolder(Path(chosen)) if chosen else RunFolder.for_recipe(recipe)
    versioned = not chosen and not force and check and not _launched()
    with contextlib.ExitStack() as held:
        try:
            if versioned:
                run, checkpoint = _claim_version(held, base, recipe, resume, console, lock)
            else:
                run, checkpoint = _claim_named(
                    held, base, recipe, resume, force, console, check, lock
                )
                if check and not checkpoint and not force and run.unfinished():
                    raise UnfinishedRun(run)
        except UnfinishedRun as unfinished:  # say how to continue it, with this command
            raise UnfinishedRun(unfinished.run, resume_command) from None
        aside = None
        if check:
            run.ensure_writable()  # an unwritable output is wrong input (2), before training
            if force and lock and checkpoint is None:
                aside = run.set_aside()  # the new run starts in an empty folder
        try:
            yield RunPlan(recipe, run, checkpoint)
        finally:
            if aside is not None:
                run.settle_replacement(aside)


def _moved_run(recipe_path: Path, recipe: Recipe, resume: str | None) -> str | None:
    """`fit RUN/recipe.yaml --resume auto` continues RUN itself, wherever it was moved to
    (its recipe still names the output folder it was trained in)."""
    home = RunFolder(Path(recipe_path).parent)
    if resume != "auto" or Path(recipe_path).name != "recipe.yaml" or not home.holds_a_run():
        return None
    named = RunFolder.for_recipe(recipe).root
    if any(path.absolute() == home.root.absolute() for _, path in versions(named)):
        return None  # where it was trained: the newest version of the name is resumed
    return str(home.root)


def _launched() -> bool:

    return world_from_environment().launched


def _claim_named(
    held: contextlib.ExitStack,
    run: RunFolder,
    recipe: Recipe,
    resume: str | None,
    force: bool,
    console: Console | None,
    check: bool,
    lock: bool,
) -> tuple[RunFolder, Path | None]:
    """{name} itself (--force, torchrun by hand, a launcher's choice): locked, recovered, and
    refused when it holds a different run (unless --force or resuming)."""
    if lock:
        _lock(held, run)
    checkpoint = _resume_path(resume, [run], console)
    if check:
        run.check_free_for(recipe, force, resuming=checkpoint is not None)
    return run, checkpoint


def _claim_version(
    held: contextlib.ExitStack,
    base: RunFolder,
    recipe: Recipe,
    resume: str | None,
    console: Console | None,
    lock: bool,
) -> tuple[RunFolder, Path | None]:
    """The version of the name to resume (--resume), or a free one for a new run, locked
    when `lock`. Two fits of one name started together each get their own: a folder another
    process locked first is skipped."""

    if resume is not None:
        candidates = [RunFolder(path) for _, path in reversed(versions(base.root))]
        checkpoint = _resume_path(resume, candidates or [base], console)
        if checkpoint is not None:
            run = _version_holding(checkpoint, candidates) or base
            if lock:
                _lock(held, run)
            return run, checkpoint
    skipped: set[Path] = set()
    while True:
        run, note = choose_version(base.root, recipe, lambda p: p in skipped or in_use(p))
        try:
            if lock:
                _lock(held, run)
        except RunInUse:  # another fit took it between the choice and the lock
            skipped.add(run.root)
            continue
        if note and console is not None:
            console.print(note, markup=False, highlight=False, soft_wrap=True)
        return run, None


def _lock(held: contextlib.ExitStack, run: RunFolder) -> None:
    """Hold the run folder's lock until `held` closes; finish or undo a save a crash cut short."""

    held.enter_context(holding(run.root, "training"))
    run.recover()


def _version_holding(checkpoint: Path, candidates: list[RunFolder]) -> RunFolder | None:
    """The run folder among `candidates` that a checkpoint lies in (checkpoints/*.pt)."""
    folder = Path(checkpoint).absolute().parent.parent
    return next((run for run in candidates if run.root.absolute() == folder), None)


def _resume_path(
    resume: str | None, candidates: list[RunFolder], console: Console | None
) -> Path | None:
    """The checkpoint to resume: a given path, or for 'auto' the last.pt of the first
    candidate that has one (the newest version of the name)."""
    if resume is None:
        return None
    if resume != "auto":
        return Path(resume)
    for run in candidates:
        if run.last_path.exists():
            return run.last_path
    if console is not None:
        console.print(
            f"no checkpoint at {candidates[0].last_path} yet: starting a new run", markup=False
        )
    return None
