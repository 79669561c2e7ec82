"""GitHub webhooks: every queued `workflow_job` gets a fresh VM with a just-in-time runner.

Pure modules (no I/O): `signature`, `labels`, `jobs` (state machine), `reconcile` (drift diff).
Adapters: `store` (SQLite), `github_api` (PyGithub). Service: `service` (dispatch, provision,
reconcile loops), `app` (Flask blueprint), `cli` (`tt-github-webhooks`).
"""
