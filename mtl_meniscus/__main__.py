"""`python -m mtl_meniscus ...`: the same commands as `mtl-meniscus` and `python cli.py`."""

from mtl_meniscus.cli import app

app(prog_name="python -m mtl_meniscus")
