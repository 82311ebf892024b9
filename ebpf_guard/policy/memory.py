"""The operator's remembered answers to ASKs, for the rest of a run (`Engine.remember`).

An answer is kept per (rule name, value): the value is what the decision was about (exec
path, open path, connect destination), or `*` for rules decided as a whole (rate rules and
FLAG escalation). The policy default is remembered under rule "".
"""

from __future__ import annotations

from ebpf_guard.policy.model import Rule

ESCALATION_PREFIX = "escalation:"
ALL = "*"  # the value of rules whose decision is not about one value (rate, escalation)


class OperatorMemory:
    """Owns the remembered answers: (rule name, value) -> allow (True) or deny (False)."""

    def __init__(self) -> None:
        self._answers: dict[tuple[str, str], bool] = {}

    def remember(self, rule: str, value: str, allow: bool) -> None:
        self._answers[(rule, ALL if rule.startswith(ESCALATION_PREFIX) else value)] = allow

    def recall(self, rule: Rule, value: str) -> bool | None:
        """The answer for `rule` about `value` (rate rules: about anything), if any."""
        return self._answers.get((rule.name, ALL if rule.rate else value))

    def get(self, rule: str, value: str) -> bool | None:
        """The answer under a plain key (the default: rule "", escalation: value ALL)."""
        return self._answers.get((rule, value))

    def allowed_rules(self) -> set[str]:
        """Rules the operator allowed for some value: the kernel must not act on them alone."""
        return {rule for (rule, _), allow in self._answers.items() if allow}
