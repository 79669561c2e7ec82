"""How a CI job ended, for the scheduler's job history (`POST /v1/envs/NAME/result`). Pure.

`tt job run`, the GitLab driver and the GitHub service report it for the ENV the job ran in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ttci.model.errors import BadInput
from ttci.wire.api import API_VERSION, check_api, require_object

__all__ = ["RESULTS", "JobResult"]

RESULTS = ("success", "failed", "cancelled", "error")  # also the order of weight: worst last


@dataclass(frozen=True)
class JobResult:
    result: str

    def __post_init__(self) -> None:
        _check(self.result)

    def worse(self, other: JobResult | None) -> JobResult:
        """The worse of the two (success < failed < cancelled < error)."""
        if other is None or RESULTS.index(self.result) >= RESULTS.index(other.result):
            return self
        return other

    def to_dict(self) -> dict[str, Any]:
        return {"api": API_VERSION, "result": self.result}

    @classmethod
    def from_dict(cls, d: Any) -> JobResult:
        if not isinstance(d, dict) or "result" not in d:
            raise BadInput("result is missing", hint='send {"result": "success"}')
        check_api(require_object(d, "the job result"), "the job result")
        return cls(_check(d["result"]))


def _check(result: Any) -> str:
    if not isinstance(result, str) or result not in RESULTS:
        raise BadInput(f"result {result!r} is not one of {', '.join(RESULTS)}", hint="e.g. failed")
    return result
