"""Built-in dataset loaders and the synthetic benchmark; importing this package registers them (zsadbench.datasets)."""

from zsadbench.datasets import (  # noqa: F401  (registration on import)
    bmad,
    ksdd2,
    meta_json,
    mvtec,
    mvtec_ad2,
    mvtec_loco,
    realiad,
    synthetic,
    visa,
)
