"""Development tooling, not installed with fashion_exp: a local team stack (PostgreSQL and an
`mlflow server`, team.py) and servers started as subprocesses for tests and benchmarks
(servers.py). The scripts beside this folder import it directly; pytest finds it through
`pythonpath` in pyproject.toml."""
