"""The embedded demo: a small real dataset (scikit-learn's bundled 8x8 digits) made hard enough
that a few-step sampler is measurably worse than a many-step one."""
