"""Built-in method plugins; importing this package registers them (zsadbench.methods)."""

from zsadbench.methods import winclip  # noqa: E402,F401  (registers "winclip")
