"""Built-in dataset loaders and the synthetic benchmark; importing this package registers them (zsadbench.datasets)."""
