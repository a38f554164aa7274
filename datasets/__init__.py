"""Built-in dataset loaders and the synthetic benchmark; importing this package registers them (zsadbench.datasets)."""

from zsadbench.datasets import meta_json, mvtec, synthetic, visa  # noqa: F401  (registration on import)
