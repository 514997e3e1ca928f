"""One module per CLI command's workflow (cli.py parses options and calls one of these)."""
