"""Task names a sweep accepts: VTAB-1k tasks by their short names, task sets, and any registered dataset.

A task is the dataset a run trains on: ``caltech101`` sets ``data.name=vtab-caltech101``, ``digits`` sets
``data.name=digits``. Sets: ``vtab`` (the 19 tasks), ``vtab-natural`` / ``vtab-specialized`` / ``vtab-structured``,
``demo`` (the mini tasks of the embedded demo) and ``coop11`` (CoOp's 11 few-shot data sets, ``coop-imagenet`` ...
``coop-ucf101``, :mod:`visionpeft.data.coop_datasets`: the task is the registered dataset's name).
"""

from __future__ import annotations

from ..errors import ConfigError, did_you_mean

#: VTAB-1k's groups (the VTAB paper's order of tasks within each group, as VPT / NOAH / PETL_Vision tables list them)
VTAB_GROUPS: dict[str, tuple[str, ...]] = {
    "Natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "Specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "Structured": (
        "clevr_count",
        "clevr_dist",
        "dmlab",
        "kitti",
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "smallnorb_ele",
    ),
}
VTAB_TASKS: tuple[str, ...] = tuple(task for group in VTAB_GROUPS.values() for task in group)
#: CoOp's 11 data sets in its tables' order (DATASETS.md), by their registered names
COOP11_TASKS: tuple[str, ...] = (
    "coop-imagenet",
    "coop-caltech101",
    "coop-oxford_pets",
    "coop-stanford_cars",
    "coop-oxford_flowers",
    "coop-food101",
    "coop-fgvc_aircraft",
    "coop-sun397",
    "coop-dtd",
    "coop-eurosat",
    "coop-ucf101",
)
TASK_SETS: dict[str, tuple[str, ...]] = {
    "vtab": VTAB_TASKS,
    **{f"vtab-{group.lower()}": tasks for group, tasks in VTAB_GROUPS.items()},
    "demo": ("digits", "textures", "faces"),
    "coop11": COOP11_TASKS,
}


def dataset_of(task: str) -> str:
    """The registered dataset a task trains on (a VTAB-1k short name gains ``vtab-``; CoOp's tasks are their names)."""
    return f"vtab-{task}" if task in VTAB_TASKS else task


def task_override(task: str) -> str:
    return f"data.name={dataset_of(task)}"


def resolve_tasks(names: list[str]) -> list[str]:
    """Task names with the sets expanded, in order, without repeats; an unknown name is a :class:`ConfigError`."""
    from ..registry import DATASETS

    known = [*TASK_SETS, *VTAB_TASKS, *DATASETS.names()]
    tasks: list[str] = []
    for name in names:
        if name in TASK_SETS:
            found = list(TASK_SETS[name])
        elif name in VTAB_TASKS or name in DATASETS.names():
            found = [name.removeprefix("vtab-") if name.removeprefix("vtab-") in VTAB_TASKS else name]
        else:
            raise ConfigError(
                f"unknown task '{name}'{did_you_mean(name, known)}; tasks are VTAB-1k names, the sets "
                f"{', '.join(TASK_SETS)}, or registered datasets"
            )
        tasks += [task for task in found if task not in tasks]
    return tasks
