"""What a run is asked to do: the recipe's schema, reading it (YAML, overrides, the user's own
modules), the registries its sections name, and the one-message errors of a bad recipe."""
