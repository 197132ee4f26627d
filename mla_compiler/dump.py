"""``python -m mla_compiler.dump [--out DIR] [--expect-matches N] -- python script.py [args]``."""

from mla_compiler.debug.cli import dump_main

if __name__ == "__main__":
    raise SystemExit(dump_main())
