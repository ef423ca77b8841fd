"""python -m parallel_adapters ..."""
from parallel_adapters.cli import main

main()
