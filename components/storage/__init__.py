"""Where sealed batches live: the interface, open_store, and one module or package per backend."""
