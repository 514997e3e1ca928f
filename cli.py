"""The command line from a checkout: `python cli.py --help`.

Installed, the same commands are `mtl-meniscus ...` and `python -m mtl_meniscus ...`; they live in
`mtl_meniscus/cli.py`.
"""

from mtl_meniscus.cli import app

if __name__ == "__main__":
    app()
