"""checkpoint/locate.py: which step directory a path (and --step) means, and errors that name
the alternatives.  Oracle: the directory layout each case builds (index.json marks a complete save)."""
import pytest

from parallel_adapters.checkpoint.layout import CheckpointError
from parallel_adapters.checkpoint.locate import complete_checkpoints, list_checkpoints, locate_checkpoint


def _run(tmp_path, steps=(20, 40), latest="step-000040", incomplete=()):
    run = tmp_path / "run"
    for step in steps:
        (run / f"step-{step:06d}").mkdir(parents=True)
        (run / f"step-{step:06d}" / "index.json").write_text("{}")
    for step in incomplete:
        (run / f"step-{step:06d}").mkdir(parents=True)
    run.mkdir(exist_ok=True)
    if latest:
        (run / "latest").write_text(latest + "\n")
    return run


def test_a_step_directory_is_taken_as_it_is(tmp_path):
    run = _run(tmp_path)
    found = locate_checkpoint(run / "step-000020")
    assert found.directory == run / "step-000020" and found.chosen_by is None
    assert locate_checkpoint(run / "step-000020", 20).directory == run / "step-000020"


def test_a_run_directory_means_its_latest_or_the_step_asked_for(tmp_path):
    run = _run(tmp_path)
    found = locate_checkpoint(run)
    assert found.directory == run / "step-000040" and found.describe() == f"using {found.directory} (named by {run / 'latest'})"
    found = locate_checkpoint(run, 20)
    assert found.directory == run / "step-000020" and found.chosen_by == "--step 20"


def test_listing_skips_incomplete_and_foreign_names(tmp_path):
    run = _run(tmp_path, incomplete=(60,))
    (run / "step-7").mkdir()
    (run / ".step-000080.tmp-abc").mkdir()
    assert [s for s, _ in list_checkpoints(run)] == [20, 40, 60]
    assert [s for s, _ in complete_checkpoints(run)] == [20, 40]


@pytest.mark.parametrize("case, needles", [
    ("missing step", ["step-000030 does not exist", "such as", "step-000040", "--step N (available: 20, 40)"]),
    ("incomplete step", ["step-000060 is incomplete (no index.json)", "available: 20, 40"]),
    ("no latest", ["no `latest`", "--step N (available: 20, 40)"]),
    ("stale latest", ["names 'step-000090'", "not a complete checkpoint", "available: 20, 40"]),
    ("empty", ["is empty", "pass a step directory", "checkpoint.directory"]),
    ("run one level down", ["holds no checkpoint, but", "run is a run's checkpoint directory: pass that"]),
    ("step mismatch", ["--step 40", "is itself one checkpoint", "leave out --step", "run with --step 40"]),
    ("a file", ["is a file, not a checkpoint directory"]),
    ("nothing there", ["does not exist"]),
])
def test_errors_name_the_alternatives(tmp_path, case, needles):
    run = _run(tmp_path, incomplete=(60,), latest=None if case == "no latest" else
               ("step-000090" if case == "stale latest" else "step-000040"))
    path, step = {
        "missing step": (run, 30), "incomplete step": (run, 60), "no latest": (run, None),
        "stale latest": (run, None), "empty": (tmp_path / "empty", None), "run one level down": (tmp_path, None),
        "step mismatch": (run / "step-000020", 40), "a file": (run / "latest", None),
        "nothing there": (tmp_path / "nowhere", None),
    }[case]
    if case == "empty":
        path.mkdir()
    with pytest.raises(CheckpointError) as info:
        locate_checkpoint(path, step)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
