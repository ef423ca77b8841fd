"""agreement.py in one process (a world of one): the result passes through, a failure becomes the
listed error that every rank would raise.  The multi-rank behaviour: tests/distributed/test_agreement.py."""
import pytest

from parallel_adapters.distributed.agreement import agreed, on_rank0, raise_listed, raise_together
from parallel_adapters.user_errors import UserError


def _boom():
    raise ValueError("boom")


def _bug():
    raise KeyError("k")


def test_agreed_returns_the_result_or_lists_the_failure():
    assert agreed(lambda: 7, "adding") == 7
    with pytest.raises(RuntimeError, match=r"^saving failed:\n  rank 0: KeyError: 'k'$"):
        agreed(_bug, "saving")


def test_a_user_error_stays_a_one_line_user_error_marked_for_every_rank():
    with pytest.raises(UserError, match=r"^saving failed: rank 0: boom$") as info:
        agreed(_boom, "saving")
    assert info.value.every_rank


def test_on_rank0_returns_the_result_or_names_rank0():
    assert on_rank0(lambda: {"a": 1}, "export") == {"a": 1}
    with pytest.raises(UserError, match=r"^export failed on rank 0: boom$"):
        on_rank0(_boom, "export")
    with pytest.raises(RuntimeError, match=r"^export failed on rank 0: KeyError: 'k'$"):
        on_rank0(_bug, "export")


def test_raise_listed_dedupes_in_order_and_keeps_the_error_type():
    raise_listed([None, None], "load")  # nothing failed: no error
    with pytest.raises(OSError, match=r"^load failed:\n  b\n  a$"):
        raise_listed(["b", None, "a", "b"], "load", error_type=OSError)


def test_raise_together_cleans_up_before_raising():
    cleaned = []
    raise_together(None, "save", cleanup=lambda: cleaned.append(1))
    assert not cleaned
    with pytest.raises(KeyError):
        raise_together("rank 0: x", "save", error_type=KeyError, cleanup=lambda: cleaned.append(1))
    assert cleaned == [1]
