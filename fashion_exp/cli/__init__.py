"""The command-line entry points (fashion-exp-train, -evaluate, -serve, -compare, -runs)."""
