"""Core data structures: structs, named axes, selectors, variables, shape checks."""
