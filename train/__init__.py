"""Training entrypoints: thin `main(argv)` wrappers over library calls, importable by tests."""
