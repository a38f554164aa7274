"""Built-in method plugins; importing this package registers them (zsadbench.methods)."""
