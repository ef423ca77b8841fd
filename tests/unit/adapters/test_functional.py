"""The adapter sharding rule (`lora_factor_specs`) against the table in its docstring."""
import pytest

from parallel_adapters.adapters.functional import lora_factor_specs
from parallel_adapters.distributed.sharding import ShardSpec


def test_sharding_rule():
    a, b = lora_factor_specs("column", 2)
    assert a.replicated and b == ShardSpec(dim=0, chunks=2)
    a, b = lora_factor_specs("row")
    assert a == ShardSpec(dim=1) and b.replicated
    a, b = lora_factor_specs("replicated")
    assert a.replicated and b.replicated


def test_unknown_parallel_mode_is_refused():
    with pytest.raises(ValueError, match="parallel_mode"):
        lora_factor_specs("diagonal")
