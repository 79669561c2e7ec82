"""GitLab Runner custom-executor driver (`tt-gitlab-executor`) and `tt gitlab register`.

`job` decides (pure), `driver` talks to the scheduler, `cli` is the runner-facing edge,
`runner_toml` renders config.toml (pure), `register` creates runners with python-gitlab.
"""
