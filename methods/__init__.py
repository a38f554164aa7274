"""Built-in method plugins; importing this package registers them (zsadbench.methods)."""

from zsadbench.methods import (
    adaclip,  # noqa: E402,F401  (registers "adaclip")
    adaptclip,  # noqa: E402,F401  (registers "adaptclip")
    anomalyclip,  # noqa: E402,F401  (registers "anomalyclip")
    anomalydino,  # noqa: E402,F401  (registers "anomalydino" and "anomalydino-batched")
    aprilgan,  # noqa: E402,F401  (registers "aprilgan")
    bayes_pfl,  # noqa: E402,F401  (registers "bayes_pfl")
    headclip,  # noqa: E402,F401  (registers "headclip")
    musc,  # noqa: E402,F401  (registers "musc")
    promptad,  # noqa: E402,F401  (registers "promptad")
    vcpclip,  # noqa: E402,F401  (registers "vcpclip")
    winclip,  # noqa: E402,F401  (registers "winclip")
)
