"""One module per pipeline stage: its config, its computation on in-memory objects, and its typed
result with symmetric save/load. A stage uses anything below it in the package, and other stages
only through their results."""
