"""Commands of this area register on rayedit.cli.app.app."""
