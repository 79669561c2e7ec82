"""What a GitHub job's VM may reach: the service's allow-list (`--allow-egress`: the runner's own
endpoints, e.g. `github.com,*.github.com,*.githubusercontent.com,*.actions.githubusercontent.com`)
plus its repository's entry in `--egress-file`, a TOML file:

    [repos."octo/app"]
    allow = ["registry.npmjs.org", "10.1.0.0/16:443"]
    audit = true        # block nothing, count and name what the list would block

Neither set: the VM may reach anything (as without allow-lists). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ttci.model.egress import EgressRule, merge_rules, parse_egress
from ttci.model.errors import BadInput

__all__ = ["RepoEgress", "job_egress", "parse_egress_file"]


@dataclass(frozen=True)
class RepoEgress:
    allow: tuple[EgressRule, ...] = ()
    audit: bool = False


def parse_egress_file(doc: Mapping[str, Any]) -> dict[str, RepoEgress]:
    """The `[repos."OWNER/NAME"]` tables of an egress file; BadInput names what is wrong."""
    repos = doc.get("repos", {})
    if not isinstance(repos, dict) or set(doc) - {"repos"}:
        raise BadInput("the egress file holds only [repos.\"OWNER/NAME\"] tables",
                       hint='e.g. [repos."octo/app"] allow = ["registry.npmjs.org"]')  # fmt: skip
    out = {}
    for repo, entry in repos.items():
        if "/" not in repo or not isinstance(entry, dict) or set(entry) - {"allow", "audit"}:
            raise BadInput(f"egress file: [repos.{repo!r}] is not OWNER/NAME with allow/audit",
                           hint='allow = ["host", ...], audit = true|false')  # fmt: skip
        if not isinstance(entry.get("audit", False), bool):
            raise BadInput(
                f"egress file: {repo}'s audit must be true or false", hint="audit = true"
            )
        out[repo.lower()] = RepoEgress(parse_egress(entry.get("allow")), entry.get("audit", False))
    return out


def job_egress(
    repo: str, default: tuple[EgressRule, ...], repos: Mapping[str, RepoEgress]
) -> tuple[tuple[EgressRule, ...], bool]:
    """(allow-list, audit) of a job of repo."""
    own = repos.get(repo.lower(), RepoEgress())
    return merge_rules(default, own.allow), own.audit
