"""Command-line tools and the helpers they share with the tests and ``perf/``: autotune, grid options, timing."""
