"""EVA's progress report (eva/progress.py): plain lines where stderr is not a terminal (pipes,
files, torchrun logs), a tqdm bar where it is; end to end through get_eva_state_dict."""
from __future__ import annotations

import io

from parallel_adapters.eva import progress
from parallel_adapters.eva.progress import Progress
from tests.distributed.eva_jobs import Block, lora_config, token_batches


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_every_n_steps_and_at_the_end_when_not_a_terminal():
    stream = io.StringIO()
    p = Progress(10, True, stream=stream, every=2)
    for step in range(1, 6):
        p.update(step, step - 1, 7)
    p.close(5, 4, 7)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("EVA step 2/10: 1/7 layers converged (") and "s/step" in lines[0]
    assert lines[1].startswith("EVA step 4/10: 3/7 layers converged (")
    assert lines[2].startswith("EVA done after 5 steps: 4/7 layers converged (")
    capped = io.StringIO()
    Progress(10, True, stream=capped, every=100).close(10, 4, 7, capped=True)
    assert capped.getvalue().startswith("EVA stopped at max_steps=10: 4/7 layers converged (")


def test_a_bar_and_no_lines_on_a_terminal():
    stream = Terminal()
    p = Progress(10, True, stream=stream, every=1)
    for step in range(1, 4):
        p.update(step, 0, 7)
    p.close(3, 0, 7)
    text = stream.getvalue()
    assert "\r" in text and "layers have converged" in text
    assert "EVA step" not in text and "EVA done" not in text


def test_silent_when_disabled():
    stream = io.StringIO()
    p = Progress(10, False, stream=stream, every=1)
    p.update(1, 0, 7)
    p.close(1, 0, 7)
    assert stream.getvalue() == ""


def test_get_eva_state_dict_logs_lines_to_a_non_terminal_stderr(capsys, monkeypatch):
    from parallel_adapters import ParallelGroups, get_adapter_model
    from parallel_adapters.eva.initialize import get_eva_state_dict

    monkeypatch.setattr(progress, "LOG_EVERY", 2)
    model = get_adapter_model(Block(), lora_config(), groups=ParallelGroups.single())
    get_eva_state_dict(model, token_batches(12, batch=4, seq=32, labels=True), show_progress_bar=True)
    err = capsys.readouterr().err.splitlines()
    steps = [line for line in err if line.startswith("EVA step ")]
    done = [line for line in err if line.startswith("EVA done after ")]
    assert steps and steps[0].startswith("EVA step 2/100: ") and "layers converged" in steps[0]
    assert len(done) == 1 and "7/7 layers converged" in done[0]
    get_eva_state_dict(get_adapter_model(Block(), lora_config(), groups=ParallelGroups.single()),
                       token_batches(12, batch=4, seq=32, labels=True), show_progress_bar=False)
    assert "EVA" not in capsys.readouterr().err
