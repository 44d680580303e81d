"""SGLang HiCache tests: their environment (env.py) and a probe of SGLang's storage interface (probe.py)."""
