"""The ``compress`` command line: thin wrappers that parse options and call one library function."""
