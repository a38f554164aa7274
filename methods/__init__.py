"""Built-in method plugins; importing this package registers them (zsadbench.methods)."""

from zsadbench.methods import (
    adaptclip,  # noqa: E402,F401  (registers "adaptclip")
    anomalyclip,  # noqa: E402,F401  (registers "anomalyclip")
    anomalydino,  # noqa: E402,F401  (registers "anomalydino" and "anomalydino-batched")
    headclip,  # noqa: E402,F401  (registers "headclip")
    musc,  # noqa: E402,F401  (registers "musc")
    winclip,  # noqa: E402,F401  (registers "winclip")
)
