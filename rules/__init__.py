"""Rule files, the safe expression compiler and the rule engine (a pure stage: no I/O, clock passed in)."""
